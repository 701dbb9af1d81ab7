"""Benchmark: what a user runs to trace one rank of an 8-rank FSDP2 QLoRA step of Llama-3.1-70B, timed whole.

Runs, as a child process,

    memplan simulate llama-3.1-70b --seq-len 4096 --num-processes 8 --strategy fsdp --json

(imports, model resolution, the fake process group, accelerate's `fsdp2_prepare_model` on meta, the
traced steps, the per-rank estimate beside it, the JSON) and prints the child's wall time, its peak RSS
(resource.getrusage(RUSAGE_CHILDREN).ru_maxrss, the largest child: the child is this script's only one), its
CPU time and, from its JSON, the traced per-rank peak per term next to the closed form's. Target: < 60 s.

    python benchmarks/bench_distributed_simulate.py [--model llama-3.1-70b] [--ranks 8] [--seq-len 4096]
        [--strategy fsdp] [--repeat N] [-- extra memplan flags, e.g. --fsdp-sharding-strategy SHARD_GRAD_OP]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def command(args: argparse.Namespace) -> list[str]:
    """The user's command line (`memplan` is `python -m memplan` from this checkout)."""
    return [sys.executable, "-m", "memplan", "simulate", args.model, "--seq-len", str(args.seq_len),
            "--num-processes", str(args.ranks), "--strategy", args.strategy, "--json", *args.extra]


def run_once(cmd: list[str]) -> tuple[float, dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # 1: the plan does not fit the GPU named (still a result)
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"memplan simulate exited {proc.returncode}")
    return wall, json.loads(proc.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-70b")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--strategy", default="fsdp", choices=("fsdp", "ddp"))
    ap.add_argument("--repeat", type=int, default=1, help="runs (the wall time of each is printed)")
    ap.add_argument("extra", nargs="*", help="more memplan flags, after --")
    args = ap.parse_args(argv)

    cmd = command(args)
    print("$ memplan " + " ".join(cmd[3:]))
    walls = []
    for _ in range(args.repeat):
        wall, d = run_once(cmd)
        walls.append(wall)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss = ru.ru_maxrss * 1024  # KiB on Linux
    cpu = (ru.ru_utime + ru.ru_stime) / len(walls)
    walls.sort()
    print(f"wall            {walls[len(walls) // 2]:8.2f} s  (median of {len(walls)}: "
          + ", ".join(f"{w:.2f}" for w in walls) + "; imports, trace, estimate and JSON: the whole command)")
    print(f"CPU time        {cpu:8.2f} s  (user + system of the child, mean per run: wall is longer on a "
          "shared machine)")
    print(f"peak RSS        {rss / GiB:8.2f} GiB  (the child process)")
    r0 = d["ranks"][0]
    est = d.get("estimate") or {}
    print(f"per-rank peak   {d['peak']['allocated_bytes'] / GiB:8.2f} GiB  traced (rank {r0['rank']} of "
          f"{args.ranks}, phase {d['peak']['phase']}); estimate "
          + (f"{est['allocated_bytes'] / GiB:.2f} GiB ({est['error_pct']:+.3f} %)" if est else "n/a"))
    for term, b in d["terms"].items():
        if b:
            print(f"  {term:<18}{b / GiB:10.3f} GiB")
    print("plan            " + ", ".join(f"{k}={d['plan'][k]}" for k in ("method", "optim", "device",
                                                                          "fsdp_sharding_strategy")
                                         if k in d["plan"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
