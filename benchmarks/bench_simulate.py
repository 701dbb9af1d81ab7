"""Benchmark: simulate one Llama-3-70B QLoRA step (seq 4096, checkpointing, CUDA emulation) on meta.

Prints wall time, peak RSS of this process and the simulated peak per term. Target: < ~10 s and
< 2 GB RSS on a 2-core machine.

    python benchmarks/bench_simulate.py [--seq-len 4096] [--steps 2] [--device cuda] [--profile]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA3_70B = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
    num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001,
)
GiB = 1 << 30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--optim", default="paged_adamw_8bit")
    ap.add_argument("--mixed-precision", default="bf16", choices=("bf16", "fp16", "no"))
    ap.add_argument("--profile", action="store_true", help="cProfile the run (top 25 by cumulative time)")
    ap.add_argument("--full-warmup", action="store_true", help="trace the warm-up step fully too")
    args = ap.parse_args(argv)

    t_imp = time.perf_counter()
    import bitsandbytes  # noqa: F401  (timed apart: a fixed per-process cost)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    t_imp = time.perf_counter() - t_imp

    from memplan.plan import TrainPlan
    from memplan.simulate import simulate

    plan = TrainPlan(method="qlora", lora_r=16, target_modules="all-linear", seq_len=args.seq_len,
                     gradient_checkpointing=True, device=args.device, optim=args.optim,
                     mixed_precision=args.mixed_precision)
    t0 = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        res = prof.runcall(simulate, LLAMA3_70B, plan, steps=args.steps, progress=True,
                           full_warmup=args.full_warmup)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    else:
        res = simulate(LLAMA3_70B, plan, steps=args.steps, progress=True, full_warmup=args.full_warmup)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(f"Llama-3-70B shape, QLoRA r=16 all-linear, seq {args.seq_len}, checkpointing, "
          f"{args.optim}, mixed precision {args.mixed_precision}, device {args.device}, {args.steps} steps"
          f"{' (full warm-up)' if args.full_warmup else ''}")
    print(f"wall            {wall:8.2f} s  simulate (+ {t_imp:.2f} s importing torch, transformers, peft, "
          f"bitsandbytes = {wall + t_imp:.2f} s)")
    print(f"peak RSS        {rss / GiB:8.2f} GiB")
    print(f"simulated peak  {res.peak_bytes / GiB:8.2f} GiB  (phase: {res.peak_phase})")
    for term, b in res.terms.items():
        if b:
            print(f"  {term:<18}{b / GiB:10.3f} GiB")
    print(f"paged (managed)  {res.paged_bytes / GiB:8.2f} GiB")
    print("phase peaks     " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in res.phase_peaks.items()) + " GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
