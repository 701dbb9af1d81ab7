#!/usr/bin/env bash
# One command on a CUDA machine: profile a fixed matrix of QLoRA/LoRA configurations (a tiny, a 1B- and
# an 8B-shaped model with random weights; checkpointing on/off; paged_adamw_8bit and adamw_torch; two
# sequence lengths), write memplan.run/1 records and an estimate-vs-measured summary. No network.
#
#   scripts/gpu_check.sh                           # the full CUDA matrix (< 8 min on one H200)
#   scripts/gpu_check.sh --device cpu --tiny       # the same machinery on the CPU, in seconds
#   scripts/gpu_check.sh --out DIR --groups tiny,1b --budget-s 300 --list --json
#
# Output: DIR/runs/*.json, DIR/summary.md, DIR/summary.json, DIR/calibration.json (default DIR:
# gpu-check-<UTC time>). Copy DIR/runs/*.json to profiles/runs/ so that tests/test_profiles.py checks
# the estimator against them. Exit status: 0 every configuration ran or ran out of memory, 1 one failed.
# PYTHON selects the interpreter (default: python3 on PATH).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's memplan, for the children too
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" -m memplan.profile.matrix "$@"
