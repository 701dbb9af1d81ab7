"""The bundled catalogue (profiles/models, profiles/gpus) and MODEL / GPU name resolution.

MODEL resolves, in order: a path to a directory holding config.json or to a config file; a
catalogue name, alias or hub id (case-insensitive); a hub id fetched through huggingface_hub when it
is installed and online.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import MemplanError, UnknownNameError
from .gpu import GPUSpec
from .model import ModelSpec, model_from_config

_HERE = Path(__file__).resolve().parent


def profiles_dir() -> Path:
    """profiles/ from a checkout (next to the package) or from an installed wheel (inside it)."""
    env = os.environ.get("MEMPLAN_PROFILES")
    for cand in ([Path(env)] if env else []) + [_HERE.parent / "profiles", _HERE / "profiles"]:
        if (cand / "models").is_dir():
            return cand
    raise MemplanError("cannot find the bundled profiles/ folder; reinstall memplan or set MEMPLAN_PROFILES")


def _load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=None)
def _model_entries() -> dict[str, dict[str, Any]]:
    return {p.stem: _load_json(p) for p in sorted((profiles_dir() / "models").glob("*.json"))}


@lru_cache(maxsize=None)
def _gpu_entries() -> dict[str, dict[str, Any]]:
    return {p.stem: _load_json(p) for p in sorted((profiles_dir() / "gpus").glob("*.json"))}


def _index(entries: dict[str, dict[str, Any]], extra_keys: tuple[str, ...]) -> dict[str, str]:
    idx: dict[str, str] = {}
    for key, e in entries.items():
        names = [e.get("name", key), *e.get("aliases", ())]
        for k in extra_keys:
            v = e.get(k)
            names += v if isinstance(v, list) else [v] if v else []
        for n in names:
            idx.setdefault(str(n).lower(), key)
    return idx


@lru_cache(maxsize=None)
def _model_index() -> dict[str, str]:
    return _index(_model_entries(), ("hub_id",))


@lru_cache(maxsize=None)
def _gpu_index() -> dict[str, str]:
    return _index(_gpu_entries(), ("full_name", "nvml_names"))


@lru_cache(maxsize=None)
def _ambiguous_gpus() -> dict[str, tuple[str, ...]]:
    """Short names that fit several GPUs of different memory ("a100": 40 or 80 GB, "v100": 16 or 32 GB):
    {name: the catalogue names it could mean}. A bare family name is one of these when another
    entry of a different size is named "<family>-..."."""
    entries = _gpu_entries()
    out: dict[str, tuple[str, ...]] = {}
    for key, e in entries.items():
        for alias in (str(a).lower() for a in e.get("aliases", ())):
            if "-" in alias:
                continue
            could = {e.get("name", key)}
            for k2, e2 in entries.items():
                names = [str(n).lower() for n in (e2.get("name", k2), *e2.get("aliases", ()))]
                if k2 != key and e2.get("memory_bytes") != e.get("memory_bytes") and any(
                        n.startswith(alias + "-") for n in names):
                    could.add(e2.get("name", k2))
            if len(could) > 1:
                out[alias] = tuple(sorted(could))
    return out


def _spec_from_entry(e: dict[str, Any]) -> ModelSpec:
    return model_from_config(e["config"], name=e["name"], hub_id=e.get("hub_id", ""),
                             aliases=tuple(e.get("aliases", ())), source=e.get("source", ""))


def load_model(model: str) -> ModelSpec:
    """A ModelSpec from a catalogue name/alias/hub id, a local directory or config.json, or the hub.

    Catalogue and hub answers are cached for the process; a local file is re-read when it changes
    (cached by its path, modification time and size).
    """
    if not isinstance(model, str) or not model.strip():
        raise MemplanError("MODEL is empty; give a catalogue name (see `memplan models`), a hub id or a path")
    text = model.strip()
    if text.startswith((".", "/", "~")) or text.endswith(".json") or os.path.isdir(text):
        path = Path(os.path.expanduser(text))
        cfg_path = path / "config.json" if path.is_dir() else path
        try:
            st = cfg_path.stat()
            stamp: tuple[Any, ...] | None = (str(cfg_path.resolve()), st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp is not None and stamp in _by_file:
            return _by_file[stamp]
        spec = _from_path(path)
        if stamp is not None:
            _by_file[stamp] = spec
        return spec
    spec = _by_name.get(text) or _load_named(text)
    if len(_by_name) < 512:
        _by_name[text] = spec
    return spec


_by_name: dict[str, ModelSpec] = {}
_by_file: dict[tuple[Any, ...], ModelSpec] = {}


#: {name as typed: note}, for hub ids resolved to a catalogue entry of the same architecture
_RESOLVED: dict[str, str] = {}


def resolution_note(model: Any) -> str:
    """How `load_model(model)` resolved a hub id that is not the catalogue's own ('' otherwise)."""
    return _RESOLVED.get(str(model).strip(), "") if isinstance(model, str) else ""


def _variant_key(text: str) -> str | None:
    """A hub id `org/Name-Instruct` (or -it, -chat-hf) whose repo name is a catalogue alias of an entry
    from the same organisation: the catalogue lists these variants because their architecture (layers,
    sizes, vocabulary) is the base model's."""
    org, _, repo = text.partition("/")
    key = _model_index().get(repo.lower())
    if key is None:
        return None
    hub = str(_model_entries()[key].get("hub_id", ""))
    return key if hub.lower().partition("/")[0] == org.lower() else None


def _load_named(text: str) -> ModelSpec:
    key = _model_index().get(text.lower())
    if key is not None:
        return _spec_from_entry(_model_entries()[key])
    if text.count("/") == 1 and (key := _variant_key(text)) is not None:
        e = _model_entries()[key]
        _RESOLVED[text] = (f"{text} resolved offline to the catalogue's {e['name']} ({e.get('hub_id', '')}): "
                           "the same architecture (an instruct/chat variant: same layers, sizes and vocabulary), "
                           "so the same memory")
        return _spec_from_entry(e)
    if "/" in text and text.count("/") == 1:
        return _from_hub(text)
    # suggest only what `memplan models` lists (names and hub ids), never the hidden aliases
    raise UnknownNameError("model", text, [e["name"] for e in _model_entries().values()]
                           + [e.get("hub_id", "") for e in _model_entries().values() if "/" in text],
                           hint="see `memplan models`, or pass a hub id or a path to a config.json")


def _from_path(path: Path) -> ModelSpec:
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise MemplanError(f"no config.json at {str(cfg_path)!r}; pass a directory holding config.json, "
                           "a config.json path, or a catalogue name (see `memplan models`)")
    try:
        cfg = _load_json(cfg_path)
    except (OSError, ValueError) as e:
        raise MemplanError(f"cannot read {str(cfg_path)!r} as JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise MemplanError(f"{str(cfg_path)!r} holds a JSON {type(cfg).__name__}, not a model config (a JSON object "
                           "like a Hugging Face config.json); pass a model's config.json or a catalogue name")
    name = cfg.get("_name_or_path") or (path.name if path.is_dir() else path.parent.name)
    return model_from_config(cfg, name=str(name), source=str(cfg_path))


def _from_hub(repo_id: str) -> ModelSpec:
    offline_msg = (f"{repo_id!r} is not in the bundled catalogue and the hub cannot be reached; "
                   "see `memplan models` for bundled models, or pass a local directory or config.json path")
    try:
        from huggingface_hub import hf_hub_download  # optional extra [hf]
    except ImportError:
        raise MemplanError(offline_msg + " (or pip install 'memplan[hf]' to fetch configs from the hub)") from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise MemplanError(f"{offline_msg} (HF_HUB_OFFLINE is set)")
    if not _hub_resolves():  # fail in milliseconds, not after huggingface_hub's five retries
        raise MemplanError(f"{offline_msg} (no network)")
    try:
        cfg_path = hf_hub_download(repo_id, "config.json", etag_timeout=5)
    except Exception as e:  # offline, gated, missing repo: one line, not a traceback
        raise MemplanError(f"{offline_msg} ({type(e).__name__})") from None
    cfg = _load_json(Path(cfg_path))
    return model_from_config(cfg, name=repo_id, hub_id=repo_id, source=f"hub:{repo_id}")


def _hub_resolves() -> bool:
    """Whether the hub's host name resolves (HF_ENDPOINT respected)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def load_gpu(gpu: str | GPUSpec) -> GPUSpec:
    """A GPUSpec from a catalogue name, alias or NVML name (case-insensitive)."""
    if isinstance(gpu, GPUSpec):
        return gpu
    text = str(gpu).strip().lower()
    choices = _ambiguous_gpus().get(text)
    if choices:
        raise MemplanError(f"GPU {str(gpu).strip()!r} is ambiguous: it could be {' or '.join(choices)} "
                           f"(different memory); give one of them, e.g. --gpu {choices[-1]} (see `memplan gpus`)")
    key = _gpu_index().get(text)
    if key is None:
        raise UnknownNameError("GPU", str(gpu), [e["name"] for e in _gpu_entries().values()],
                               hint="see `memplan gpus`")
    return _gpu_spec(key)


@lru_cache(maxsize=None)
def _gpu_spec(key: str) -> GPUSpec:
    return GPUSpec.from_dict(_gpu_entries()[key])


def list_models() -> list[ModelSpec]:
    return [_spec_from_entry(e) for e in _model_entries().values()]


def list_gpus() -> list[GPUSpec]:
    return sorted((GPUSpec.from_dict(e) for e in _gpu_entries().values()), key=lambda g: g.memory_bytes)


def resolve_model(model: Any) -> ModelSpec:
    """Anything a user may pass as MODEL: ModelSpec, name/path string, config dict or PretrainedConfig."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        return load_model(model)
    if isinstance(model, dict) or hasattr(model, "to_dict"):
        name = (model.get("_name_or_path") if isinstance(model, dict) else getattr(model, "_name_or_path", "")) or ""
        return model_from_config(model, name=str(name) or "custom")
    raise MemplanError(f"cannot read a model from {type(model).__name__}; pass a catalogue name, hub id, "
                       "path, config.json dict or transformers PretrainedConfig")
