"""README's recipe table (issue 11): Llama-3-8B QLoRA on an RTX 4090 at seq 4096, the largest micro-batch
and longest sequence with each technique on, as `memplan recommend` finds them (closed form, no torch).
Every row of the README table is recomputed by scripts/technique_table.py and must read the same."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("technique_table", ROOT / "scripts" / "technique_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _readme_table() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("| technique | flags | largest micro-batch at seq 4096 |")
    lines = []
    for line in text[start:].splitlines():
        if not line.startswith("|"):
            break
        lines.append(line)
    return lines


def test_readme_recipe_table_is_what_recommend_says():
    assert _readme_table() == _script().table()


def test_the_techniques_move_the_limit_as_the_readme_says():
    t = _script()
    rows = {name: t.row(fields) for name, _, fields, _ in t.ROWS}
    base = rows["none (HF Trainer, SDPA, checkpointing)"]
    assert base[0] == 1 and base[3] == 0  # one micro-batch of 4096 tokens, nothing on the host
    assert rows["no gradient checkpointing"][0] == 0  # none fits
    # removing the [tokens x vocab] logits moves the limit; the attention kernel and packing do not
    for name in ("Liger fused linear cross-entropy", "Liger, all default kernels", "TRL SFTTrainer (its fused LM head)"):
        assert rows[name][0] >= 3, name
    for name in ("FlashAttention-2", "packing (SDPA, block-diagonal mask)", "padding-free + FlashAttention-2"):
        assert rows[name][0] == 1, name
    for name in ("activation offloading", "checkpoint offload (axolotl)"):
        assert rows[name][0] == 2 and rows[name][3] > 1.5, name  # GiB on the host


def test_the_recommend_command_prints_the_row(tmp_path):
    """The public command a user types, for one row (the table's figures come from the same search)."""
    r = subprocess.run([sys.executable, "-m", "memplan", "recommend", "llama-3-8b", "--gpu", "rtx-4090", "--seq-len",
                        "4096", "--use-liger-kernel"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "largest micro-batch at seq len 4096: 4" in r.stdout
