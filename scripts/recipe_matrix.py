"""estimate vs simulate over the recipe matrix of issue 9: attention (sdpa, eager) x padding (none,
longest) x checkpointing (non-reentrant, reentrant) x adapters (fp32, bf16), on three real catalogue
shapes (2 decoder layers), at several sequence lengths, emulating cuda and cpu.

    python scripts/recipe_matrix.py [--seqs 512,2048,8192] [--models llama-3.2-1b,mistral-7b-v0.1,qwen2.5-7b]

Prints one row per configuration and the median / max |error| of the peak; tests/test_agreement_sim.py
runs a subset of it in the test suite.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time


def rows(models, seqs, devices):
    from memplan.catalogue import load_model
    from memplan.estimate import compute
    from memplan.model import model_from_config
    from memplan.plan import TrainPlan
    from memplan.simulate import simulate
    from memplan.terms import Term

    for model in models:
        cfg = copy.deepcopy(dict(load_model(model).config))
        cfg["num_hidden_layers"] = 2
        cfg.pop("layer_types", None)
        spec = model_from_config(cfg)
        for seq, attn, pad, reent, adapter, dev in itertools.product(
                seqs, ("sdpa", "eager"), ("none", "longest"), (False, True), ("fp32", "bf16"), devices):
            plan = TrainPlan(device=dev, seq_len=seq, attn_implementation=attn, padding=pad, use_reentrant=reent,
                             adapter_dtype=adapter, lora_dropout=0.0, optim="adamw_torch")
            t0 = time.perf_counter()
            e = compute(spec, plan)
            est = e.allocated_bytes - e.terms[Term.WORKSPACE]
            sim = simulate(cfg, plan).peak_bytes
            yield (model, seq, attn, pad, "reentrant" if reent else "non-reentrant", adapter, dev, e.moment,
                   est, sim, (est - sim) / sim * 100, time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-3.2-1b,mistral-7b-v0.1,qwen2.5-7b")
    ap.add_argument("--seqs", default="512,2048,8192")
    ap.add_argument("--devices", default="cuda,cpu")
    a = ap.parse_args(argv)
    errs = []
    print("| model | seq | attention | padding | checkpointing | adapters | device | peak moment | estimate | simulate "
          "| error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows(a.models.split(","), [int(s) for s in a.seqs.split(",")], a.devices.split(",")):
        errs.append(abs(r[10]))
        print(f"| {' | '.join(map(str, r[:8]))} | {r[8]:,} | {r[9]:,} | {r[10]:+.3f} % |", flush=True)
    print(f"{len(errs)} configurations: median |error| {statistics.median(errs):.3f} %, max {max(errs):.3f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
