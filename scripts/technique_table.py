"""README's recipe table: Llama-3-8B QLoRA on a 24 GB card (RTX 4090) at seq 4096, the largest
micro-batch and longest sequence with each memory technique on, from `memplan.recommend` (the same
search `memplan recommend` runs; closed form, no torch).

    python scripts/technique_table.py          # prints the markdown table README.md carries

tests/test_techniques.py asserts README's rows against this function, row by row.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memplan import estimate, recommend  # noqa: E402
from memplan.present import gib  # noqa: E402

MODEL, GPU, SEQ = "llama-3-8b", "rtx-4090", 4096

#: (technique, the flags a user types, plan fields, how the figure is checked)
ROWS = [
    ("none (HF Trainer, SDPA, checkpointing)", "", {}, "real CPU steps"),
    ("no gradient checkpointing", "--no-gradient-checkpointing", {"gradient_checkpointing": False}, "real CPU steps"),
    ("FlashAttention-2", "--attn-implementation flash_attention_2", {"attn_implementation": "flash_attention_2"},
     "simulate (CUDA only)"),
    ("packing (SDPA, block-diagonal mask)", "--packing", {"packing": True}, "real CPU steps"),
    ("padding-free + FlashAttention-2", "--padding-free --attn-implementation flash_attention_2",
     {"padding_free": True, "attn_implementation": "flash_attention_2"}, "simulate (CUDA only)"),
    ("Liger fused linear cross-entropy", "--liger-kernels fused_linear_cross_entropy",
     {"use_liger_kernel": True, "liger_kernel_config": "fused_linear_cross_entropy"}, "simulate (Triton, GPU only)"),
    ("Liger, all default kernels", "--use-liger-kernel", {"use_liger_kernel": True}, "simulate (Triton, GPU only)"),
    ("TRL SFTTrainer (its fused LM head)", "--trainer sft", {"trainer": "sft"}, "real CPU steps"),
    ("TRL SFTTrainer + Liger (layer kernels)", "--trainer sft --use-liger-kernel",
     {"trainer": "sft", "use_liger_kernel": True}, "simulate (Triton, GPU only)"),
    ("activation offloading", "--activation-offloading", {"activation_offloading": True}, "real CPU steps"),
    ("checkpoint offload (axolotl)", "--checkpoint-offload", {"checkpoint_offload": True}, "source + simulate"),
]


def row(fields: dict) -> tuple[int, int, float, float]:
    """(largest micro-batch at SEQ, longest seq at micro-batch 1, device GiB and host GiB at batch 1)."""
    r = recommend(MODEL, GPU, seq_len=SEQ, **fields)
    e = estimate(MODEL, gpu=GPU, seq_len=SEQ, batch_size=1, **fields)
    return (r.max_batch_size or 0, r.max_seq_len or 0, float(gib(e.device_bytes)), float(gib(e.host_bytes)))


def table() -> list[str]:
    out = ["| technique | flags | largest micro-batch at seq 4096 | longest seq at micro-batch 1 | "
           "device GiB at micro-batch 1 | host RAM GiB at the device peak | checked against |",
           "|---|---|---|---|---|---|---|"]
    for name, flags, fields, checked in ROWS:
        b, s, dev, host = row(fields)
        out.append(f"| {name} | `{flags or '(defaults)'}` | {b or 'none'} | {s} | {dev:.2f} | "
                   f"{host:.2f} | {checked} |")
    return out


if __name__ == "__main__":
    print("\n".join(table()))
