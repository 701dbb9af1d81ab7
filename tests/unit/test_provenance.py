"""Provenance text in the bundled catalogue cites public sources (issue 14): a hub URL, a repository
path, an issue or PR, a docs page; never words that mean nothing to a user ("index id ...", "the code
corpus", "the brief", "from memory"), and a model config says plainly that it was not re-fetched."""
import json
import re
from pathlib import Path

import pytest

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
FILES = sorted((PROFILES / "models").glob("*.json")) + sorted((PROFILES / "gpus").glob("*.json"))
BANNED = re.compile(r"index (file )?ids?\b|code corpus|the brief|from memory|exact search", re.I)


def _sources(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "source" in k and isinstance(v, str):
                yield f"{path}/{k}", v
            yield from _sources(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _sources(v, f"{path}/{i}")


def test_every_profile_has_sources():
    assert len(FILES) >= 40
    for f in FILES:
        assert list(_sources(json.loads(f.read_text(encoding="utf-8")))), f.name


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sources_cite_public_places(path):
    for where, text in _sources(json.loads(path.read_text(encoding="utf-8"))):
        assert not BANNED.search(text), f"{path.name}{where}: {BANNED.search(text).group(0)!r} in {text!r}"


@pytest.mark.parametrize("path", sorted((PROFILES / "models").glob("*.json")), ids=lambda p: p.name)
def test_model_source_names_the_hub_file_and_says_it_was_not_refetched(path):
    d = json.loads(path.read_text(encoding="utf-8"))
    url = f"https://huggingface.co/{d['hub_id']}/blob/main/config.json"
    src = d["source"]
    assert src.startswith("https://huggingface.co/") and src.split(";")[0].endswith("/config.json")
    assert f"Values as published on {src.split(';')[0]}; not re-fetched from the hub for this catalogue." in src
    assert d["hub_id"] in src or url in src or "TinyLlama" in src
