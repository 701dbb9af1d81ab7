"""Benchmark: rows per second of `memplan.sweep` on a 10,000-row grid (5 models x 10 GPUs x
(QLoRA, LoRA) x 4 ranks x 5 sequence lengths x 5 micro-batches), with and without the exact
max-batch / max-seq-len searches. Needs the report extra (pandas).

    python benchmarks/bench_sweep.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ["llama-3-8b", "qwen2.5-7b", "llama-2-70b", "mistral-7b", "phi-3-mini-4k"]
GPUS = ["t4", "a10g", "l4", "rtx-4090", "a100-40gb", "l40s", "rtx-a6000", "a100-80gb", "h100-80gb", "h200"]
GRID = dict(methods=("qlora", "lora"), ranks=(8, 16, 32, 64), seq_lens=(512, 1024, 2048, 4096, 8192),
            batch_sizes=(1, 2, 4, 8, 16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from memplan.report import sweep

    for limits in (True, False):
        rates = []
        for _ in range(args.repeat):
            df = sweep(MODELS, GPUS, progress=False, limits=limits, **GRID)
            rates.append(df.attrs["memplan"]["rows_per_second"])
        print(f"{len(df)} rows, limits={'on ' if limits else 'off'}: median {statistics.median(rates):,.0f} rows/s "
              f"({len(df) / statistics.median(rates):.2f} s; runs: {', '.join(f'{r:,.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
