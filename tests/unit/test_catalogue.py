"""MODEL and GPU resolution: names, aliases, hub ids, local paths; the offline hub message."""

from __future__ import annotations

import json

import pytest

from memplan.catalogue import list_gpus, load_gpu, load_model, profiles_dir, resolve_model
from memplan.errors import MemplanError, UnknownNameError
from memplan.units import MiB


@pytest.mark.parametrize("name", ["llama-2-7b", "LLAMA-2-7B", "meta-llama/Llama-2-7b-hf", "Llama-2-7b-hf"])
def test_model_names_aliases_and_hub_ids(name):
    assert load_model(name).params == 6_738_415_616


def test_local_directory_and_config_path(tmp_path):
    cfg = json.loads((profiles_dir() / "models" / "tinyllama-1.1b.json").read_text())["config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(str(tmp_path)).params == load_model("tinyllama-1.1b").params
    assert load_model(str(tmp_path / "config.json")).params == load_model("tinyllama-1.1b").params


def test_a_pretrainedconfig_like_object_and_a_dict():
    cfg = json.loads((profiles_dir() / "models" / "qwen2.5-0.5b.json").read_text())["config"]

    class FakePretrainedConfig:
        def to_dict(self):
            return dict(cfg)

    assert resolve_model(FakePretrainedConfig()).params == load_model("qwen2.5-0.5b").params
    assert resolve_model(cfg).params == load_model("qwen2.5-0.5b").params


def test_unknown_model_suggests():
    with pytest.raises(UnknownNameError, match="did you mean.*llama-2-13b"):
        load_model("llama-2-13")


def test_offline_hub_id_names_the_catalogue_and_the_path_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MemplanError) as e:
        load_model("someone/not-in-the-catalogue-7b")
    msg = str(e.value)
    assert "memplan models" in msg and "config.json" in msg


def test_missing_path():
    with pytest.raises(MemplanError, match="no config.json"):
        load_model("./does/not/exist")


def test_gpus_as_the_driver_reports_them():
    assert len(list_gpus()) >= 15
    assert load_gpu("a100-80gb").memory_bytes == 81920 * MiB
    assert load_gpu("NVIDIA H100 80GB HBM3").name == "h100-80gb"
    assert load_gpu("t4").bf16 is False and load_gpu("a10g").bf16 is True
    with pytest.raises(UnknownNameError, match="did you mean"):
        load_gpu("a100-80")


def test_an_edited_local_config_is_read_again(tmp_path):
    """Bug (issue 8): local config paths were cached for the process with no way to see an edit."""
    cfg = json.loads((profiles_dir() / "models" / "tinyllama-1.1b.json").read_text())["config"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    first = load_model(str(tmp_path))
    assert load_model(str(tmp_path)) is first  # unchanged: cached
    # NB: a longer file, so the edit shows even within the file system's timestamp granularity
    path.write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1}, indent=2))
    assert load_model(str(tmp_path)).num_layers == first.num_layers + 1
    assert load_model(str(path)).num_layers == first.num_layers + 1
