#!/usr/bin/env bash
# Regenerate the committed CPU run records in profiles/runs/ (tiny random models, several architectures
# and plans) with `memplan profile --device cpu`. About 3 minutes on 2 cores. Old cpu-tiny-* records are
# replaced; GPU records are left alone. MEMPLAN=... selects the memplan executable.
set -euo pipefail
cd "$(dirname "$0")/../.."
M=${MEMPLAN:-memplan}
C=tests/profile/configs
OUT=profiles/runs/
rm -f "$OUT"cpu-tiny-*.json
run() { "$M" profile "$@" --device cpu --quiet --out "$OUT" | grep -E "^status|allocated \(peak\)|run record"; }
run $C/tiny-llama   --seq-len 128
run $C/tiny-llama   --seq-len 128 --no-gradient-checkpointing --lora-dropout 0
run $C/tiny-llama   --seq-len 128 --method lora --no-gradient-checkpointing
run $C/tiny-llama   --seq-len 128 --method lora --mixed-precision no
run $C/tiny-llama   --seq-len 128 --attn-implementation eager --no-gradient-checkpointing --optim adamw_torch --lora-dropout 0
run $C/tiny-llama   --seq-len 128 --batch-size 2 --gradient-accumulation-steps 2 --optim adamw_torch_fused --no-gradient-checkpointing
run $C/tiny-mistral --seq-len 256 --optim sgd
run $C/tiny-qwen2   --seq-len 128 --no-gradient-checkpointing
run $C/tiny-qwen3   --seq-len 128 --optim paged_adamw_32bit
run $C/tiny-gemma   --seq-len 128 --no-gradient-checkpointing
run $C/tiny-gemma3  --seq-len 128 --lora-dropout 0
run $C/tiny-phi3    --seq-len 128 --no-gradient-checkpointing
