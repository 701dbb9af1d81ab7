"""`simulate` does what its help says (issue 14): causal LMs outside the closed form's table (gpt2 with its
Conv1D layers) are traced; a config AutoModelForCausalLM cannot build gets an exact message."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.cli import SIM_COVERS, main  # noqa: E402

GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 128}
T5 = {"model_type": "t5", "d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16, "vocab_size": 1000}


def _cfg(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_gpt2_conv1d_is_traced_and_quantized(tmp_path, capsys):
    code = main(["simulate", _cfg(tmp_path, GPT2), "--device", "cpu", "--seq-len", "64", "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    # 2 layers x (c_attn 64x192 + c_proj 64x64 + c_fc 64x256 + mlp c_proj 256x64) Conv1D weights, packed 4-bit
    assert d["terms"]["base_weights"] == 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64) // 2
    assert d["model"]["model_type"] == "gpt2" and any("outside the closed-form" in n for n in d["notes"])


def test_seq2seq_config_gets_the_exact_coverage(tmp_path, capsys):
    code = main(["simulate", _cfg(tmp_path, T5), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "model_type 't5' cannot be simulated" in err and SIM_COVERS in err


def test_help_states_the_coverage(capsys):
    assert main(["simulate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "AutoModelForCausalLM" in out and "gpt2" in out and "Conv1D" in out
