"""Names and flags users type (issue 14): instruct/chat hub ids resolve offline to the catalogue's base
model, HF/TRL flag spellings are aliases, "did you mean" names only what `memplan models` and the
command's --help list, and --json says nothing about double quant when nothing is 4-bit."""

from __future__ import annotations

import json

import pytest

from memplan.catalogue import list_models, load_model, resolution_note
from memplan.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("hub_id, name", [
    ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("google/gemma-2-9b-it", "gemma-2-9b"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-v0.3"),
    ("meta-llama/Llama-2-7b-chat-hf", "llama-2-7b"),
])
def test_instruct_hub_ids_resolve_offline(monkeypatch, capsys, hub_id, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_model(hub_id).name == name
    assert "same architecture" in resolution_note(hub_id)
    code, out, err = run(capsys, "estimate", hub_id, "--json")
    assert code == 0 and "memplan: note:" in err and name in err
    assert json.loads(out)["model"]["params"] == load_model(name).params


def test_other_orgs_are_not_guessed(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from memplan.errors import MemplanError

    with pytest.raises(MemplanError):
        load_model("someone/Meta-Llama-3-8B-Instruct")


def test_hf_trl_flag_spellings(capsys):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--per_device_train_batch_size", "4", "--max_seq_length",
                       "1024", "--lora_r", "8", "--lora_alpha", "16", "--gradient_accumulation_steps", "2", "--fp16",
                       "--json")
    p = json.loads(out)["plan"]
    assert code == 0 and (p["batch_size"], p["seq_len"], p["lora_r"], p["lora_alpha"]) == (4, 1024, 8, 16)
    assert p["gradient_accumulation_steps"] == 2 and p["mixed_precision"] == "fp16"
    for flag in ("--max-seq-length", "--max_length"):
        code, out, _ = run(capsys, "estimate", "llama-2-7b", flag, "512", "--bf16", "--json")
        assert json.loads(out)["plan"]["seq_len"] == 512 and json.loads(out)["plan"]["mixed_precision"] == "bf16"


def test_aliases_stay_out_of_help(capsys):
    assert main(["estimate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--per_device_train_batch_size" not in out and "--batch-size" in out


@pytest.mark.parametrize("argv, want", [
    (["fit", "llama-2-7b", "--gpu", "a10g", "--seqlen", "5"], "--seq-len"),
    (["estimate", "llama-2-7b", "--gradient-checkpoint"], "--gradient-checkpointing"),
    (["recommend", "llama-2-7b", "--gpu", "a10g", "--lora-rank", "8"], "--lora-r"),
])
def test_unknown_flag_did_you_mean(capsys, argv, want):
    code, out, err = run(capsys, *argv)
    assert code == 2 and f"did you mean {want}" in err and f"`memplan {argv[0]} --help`" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("typo", ["llama3-8bb", "llama-31-8bx", "qwen25-7bb", "mistral-7b-v3x"])
def test_did_you_mean_only_listed_names(capsys, typo):
    listed = {m.name for m in list_models()} | {m.hub_id for m in list_models()}
    code, _, err = run(capsys, "estimate", typo)
    assert code == 2 and "did you mean" in err
    suggested = err.split("did you mean ", 1)[1].split("?")[0].replace("'", "").split(" or ")
    assert suggested and all(s in listed for s in suggested), suggested


@pytest.mark.parametrize("argv, dq", [
    (["estimate", "llama-2-7b", "--method", "lora"], None),
    (["fit", "llama-2-7b", "--gpu", "a100-80gb", "--method", "full"], None),
    (["fit", "llama-2-7b", "--gpu", "a10g", "--quant", "int8"], None),
    (["estimate", "llama-2-7b"], True),
    (["estimate", "llama-2-7b", "--no-double-quant"], False),
    (["recommend", "llama-2-7b", "--gpu", "a10g", "--method", "lora"], None),
])
def test_json_double_quant_means_something(capsys, argv, dq):
    code, out, _ = run(capsys, *argv, "--json")
    assert code in (0, 1) and json.loads(out)["plan"]["double_quant"] is dq
