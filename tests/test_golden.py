"""Estimate JSON for a handful of real models, byte for byte.

A change in any number here is a change in what memplan tells users: regenerate deliberately with
`python -m pytest tests/test_golden.py --update-golden` and say why in the commit message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import memplan

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "llama-2-7b_a10g_default": ("llama-2-7b", "a10g", {}),
    "llama-3-8b_a100-80gb_seq4096_b4": ("llama-3-8b", "a100-80gb", {"seq_len": 4096, "batch_size": 4}),
    "llama-3-70b_rtx-a6000_default": ("llama-3-70b", "rtx-a6000", {}),
    "qwen2.5-7b_l4_lora": ("qwen2.5-7b", "l4", {"method": "lora", "optim": "adamw_torch_fused"}),
    "gemma-2-9b_rtx-4090_eager": ("gemma-2-9b", "rtx-4090", {"attn_implementation": "eager", "seq_len": 1024}),
    "phi-3-mini-4k_t4_fp16_nogc": ("phi-3-mini-4k", "t4", {"mixed_precision": "fp16", "compute_dtype": "fp16",
                                                          "dtype": "fp16", "gradient_checkpointing": False,
                                                          "seq_len": 1024}),
    "tinyllama-1.1b_cpu": ("tinyllama-1.1b", None, {"device": "cpu", "seq_len": 512}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name, request):
    model, gpu, kw = CASES[name]
    got = memplan.estimate(model, gpu=gpu, **kw).to_dict()
    path = GOLDEN / f"{name}.json"
    if request.config.getoption("--update-golden") or not path.exists():
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        if not request.config.getoption("--update-golden"):
            pytest.fail(f"wrote missing golden file {path.name}; commit it")
    assert got == json.loads(path.read_text())
