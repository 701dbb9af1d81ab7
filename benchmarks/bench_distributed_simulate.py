"""Benchmark: simulate one rank of a Llama-3-70B FSDP2 FULL_SHARD QLoRA step over 8 ranks, on meta.

The fake process group (torch.testing._internal.distributed.fake_pg) stands in for the 8 ranks; the
model is sharded by accelerate's own `fsdp2_prepare_model` (memplan.simulate.distributed). Prints wall
time, peak RSS of this process and the simulated per-rank peak per term. Target: < 60 s.

    python benchmarks/bench_distributed_simulate.py [--ranks 8] [--seq-len 4096] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_simulate import LLAMA3_70B  # noqa: E402

GiB = 1 << 30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--optim", default="adamw_torch_fused")
    ap.add_argument("--sharding", default="FULL_SHARD", choices=("FULL_SHARD", "SHARD_GRAD_OP"))
    ap.add_argument("--no-gc", action="store_true", help="without gradient checkpointing")
    args = ap.parse_args(argv)

    t_imp = time.perf_counter()
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    t_imp = time.perf_counter() - t_imp
    from memplan.plan import TrainPlan
    from memplan.runtime.distributed import World
    from memplan.simulate.distributed import simulate_rank

    plan = TrainPlan(method="qlora", lora_r=16, target_modules="all-linear", seq_len=args.seq_len,
                     gradient_checkpointing=not args.no_gc, device=args.device, optim=args.optim)
    world = World(num_processes=args.ranks, strategy="fsdp", fsdp_sharding_strategy=args.sharding)
    t0, c0 = time.perf_counter(), time.process_time()
    res = simulate_rank(LLAMA3_70B, plan, world, rank=args.rank)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"Llama-3-70B shape, QLoRA r=16 all-linear (quant storage {world.quant_storage(plan)}), seq {args.seq_len}, "
          f"checkpointing {'off' if args.no_gc else 'on'}, {args.optim}, FSDP2 {args.sharding} over {args.ranks} "
          f"ranks (rank {args.rank}), device {args.device}")
    print(f"wall            {wall:8.2f} s  simulate (+ {t_imp:.2f} s importing = {wall + t_imp:.2f} s)")
    print(f"CPU time        {cpu:8.2f} s  (this process; wall is longer on a shared machine)")
    print(f"peak RSS        {rss / GiB:8.2f} GiB")
    print(f"per-rank peak   {res.peak_bytes / GiB:8.2f} GiB  (phase: {res.peak_phase})")
    for term, b in res.terms.items():
        if b:
            print(f"  {term:<18}{b / GiB:10.3f} GiB")
    print("  comm detail     " + ", ".join(f"{k} {v / GiB:.3f}" for k, v in res.comm_detail.items()) + " GiB")
    print("phase peaks     " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in res.phase_peaks.items()) + " GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
