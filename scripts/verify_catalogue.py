#!/usr/bin/env python3
"""Verify the bundled memplan catalogue under profiles/.

Models (profiles/models/*.json):
  * exact key set, types, file name == name + ".json", lowercase name;
  * the config builds with transformers (AutoConfig.for_model + AutoModelForCausalLM.from_config
    on the meta device; AutoModelForImageTextToText for a multimodal config with a vision_config) and the unique parameter count (tied weights once) equals the stored
    "params".

GPUs (profiles/gpus/*.json):
  * exact key set and types (including the "overheads" block), file name == name + ".json";
  * memory_bytes is a whole number of MiB, bf16 agrees with compute capability >= 8.0.

Both: names and aliases are unique across their catalogue (case-insensitive).

Exits non-zero on any problem.  Usage:

    python scripts/verify_catalogue.py [--models-only | --gpus-only] [--skip-params] [NAME ...]

NAME filters the model check to the given catalogue names.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "profiles" / "models"
GPUS_DIR = ROOT / "profiles" / "gpus"

MODEL_KEYS = {
    "name": str,
    "hub_id": str,
    "aliases": list,
    "source": str,
    "params": int,
    "config": dict,
}
GPU_KEYS = {
    "name": str,
    "full_name": str,
    "aliases": list,
    "nvml_names": list,
    "memory_bytes": int,
    "memory_source": str,
    "compute_capability": str,
    "bf16": bool,
    "architecture": str,
    "overheads": dict,
}
OVERHEAD_KEYS = {
    "cuda_context_bytes": int,
    "cuda_context_source": str,
    "workspace_bytes": int,
    "workspace_source": str,
    "reserve_ratio": float,
    "reserve_source": str,
}
ARCHITECTURES = {"volta", "turing", "ampere", "ada", "hopper", "blackwell"}
MIB = 1 << 20


def _is_type(value, expected) -> bool:
    # bool is a subclass of int: never accept it where an int is wanted.
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def _check_keys(obj: dict, spec: dict, where: str, errors: list[str]) -> None:
    missing = sorted(set(spec) - set(obj))
    extra = sorted(set(obj) - set(spec))
    if missing:
        errors.append(f"{where}: missing keys {missing}")
    if extra:
        errors.append(f"{where}: unexpected keys {extra}")
    for key, typ in spec.items():
        if key in obj and not _is_type(obj[key], typ):
            errors.append(f"{where}: {key!r} should be {typ.__name__}, got {type(obj[key]).__name__}")


def _load(path: Path, errors: list[str]):
    try:
        with path.open() as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        errors.append(f"{path.name}: cannot read JSON: {exc}")
        return None
    if not isinstance(data, dict):
        errors.append(f"{path.name}: top level is not an object")
        return None
    return data


def _check_names(entries: list[tuple[str, dict]], kind: str, errors: list[str]) -> None:
    """Names and aliases must be unique (case-insensitive) across one catalogue."""
    owner: dict[str, str] = {}
    for fname, data in entries:
        name = data.get("name")
        labels = [name] if isinstance(name, str) else []
        aliases = data.get("aliases")
        if isinstance(aliases, list):
            for alias in aliases:
                if not isinstance(alias, str) or not alias.strip():
                    errors.append(f"{kind} {fname}: alias {alias!r} is not a non-empty string")
                else:
                    labels.append(alias)
        seen_here: set[str] = set()
        for label in labels:
            key = label.strip().lower()
            if key in seen_here:
                errors.append(f"{kind} {fname}: label {label!r} repeated within the file")
                continue
            seen_here.add(key)
            if key in owner:
                errors.append(f"{kind} {fname}: label {label!r} collides with {owner[key]}")
            else:
                owner[key] = fname


def count_params(config: dict) -> tuple[int, str]:
    """Unique parameter count of the model transformers builds from a config.json dict."""
    import torch
    import transformers

    # transformers 5 normalises rope settings in place (it writes rope_theta into rope_scaling):
    # build from a copy so the caller's dict stays as read.
    cfg = transformers.AutoConfig.for_model(**copy.deepcopy(config))
    # a multimodal checkpoint (vision_config: Llama 4) is the model AutoModelForImageTextToText builds,
    # frozen vision tower included
    auto = transformers.AutoModelForImageTextToText if "vision_config" in config else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg, trust_remote_code=False)
    # parameters() yields each Parameter once, so tied embeddings count once.
    return sum(p.numel() for p in model.parameters()), type(model).__name__


def verify_models(names: list[str], skip_params: bool, errors: list[str]) -> None:
    files = sorted(MODELS_DIR.glob("*.json"))
    if not files:
        errors.append(f"no model files in {MODELS_DIR}")
        return
    entries = []
    for path in files:
        data = _load(path, errors)
        if data is None:
            continue
        entries.append((path.name, data))
        where = f"model {path.name}"
        _check_keys(data, MODEL_KEYS, where, errors)
        name = data.get("name")
        if isinstance(name, str):
            if path.stem != name:
                errors.append(f"{where}: file name does not match name {name!r}")
            if name != name.lower():
                errors.append(f"{where}: name {name!r} is not lowercase")
        hub_id = data.get("hub_id")
        if isinstance(hub_id, str) and "/" not in hub_id:
            errors.append(f"{where}: hub_id {hub_id!r} is not of the form owner/repo")
        config = data.get("config")
        if isinstance(config, dict) and not isinstance(config.get("model_type"), str):
            errors.append(f"{where}: config has no model_type")
    _check_names(entries, "model", errors)

    if skip_params:
        return
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as exc:
        errors.append(f"cannot import torch/transformers for the parameter check: {exc}")
        return
    transformers.logging.set_verbosity_error()

    wanted = {n.lower() for n in names}
    print(f"transformers {transformers.__version__}")
    print(f"{'name':22s} {'class':26s} {'computed':>17s} {'stored':>17s}  result")
    n_checked = n_bad = 0
    for fname, data in entries:
        name = data.get("name", fname)
        if wanted and str(name).lower() not in wanted:
            continue
        config, stored = data.get("config"), data.get("params")
        if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
            continue
        n_checked += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                computed, cls = count_params(config)
        except Exception as exc:  # report every failure, keep going
            n_bad += 1
            errors.append(f"model {fname}: transformers could not build it: {type(exc).__name__}: {exc}")
            print(f"{name:22s} {'-':26s} {'-':>17s} {stored!s:>17s}  ERROR")
            continue
        ok = computed == stored
        if not ok:
            n_bad += 1
            errors.append(f"model {fname}: computed params {computed:,} != stored {stored!r}")
        stored_txt = f"{stored:,}" if isinstance(stored, int) else repr(stored)
        print(f"{name:22s} {cls:26s} {computed:>17,} {stored_txt:>17s}  {'match' if ok else 'MISMATCH'}")
    if wanted and n_checked < len(wanted):
        errors.append(f"model names not found: {sorted(wanted - {str(d.get('name')).lower() for _, d in entries})}")
    print(f"models: {n_checked} checked, {n_checked - n_bad} match, {n_bad} mismatch/error")


def verify_gpus(errors: list[str]) -> None:
    files = sorted(GPUS_DIR.glob("*.json"))
    if not files:
        errors.append(f"no GPU files in {GPUS_DIR}")
        return
    entries = []
    for path in files:
        data = _load(path, errors)
        if data is None:
            continue
        entries.append((path.name, data))
        where = f"gpu {path.name}"
        _check_keys(data, GPU_KEYS, where, errors)
        name = data.get("name")
        if isinstance(name, str) and path.stem != name:
            errors.append(f"{where}: file name does not match name {name!r}")
        for key in ("aliases", "nvml_names"):
            if isinstance(data.get(key), list) and not all(isinstance(x, str) for x in data[key]):
                errors.append(f"{where}: {key} must be a list of strings")
        if isinstance(data.get("nvml_names"), list) and not data["nvml_names"]:
            errors.append(f"{where}: nvml_names is empty")
        mem = data.get("memory_bytes")
        if _is_type(mem, int) and (mem <= 0 or mem % MIB):
            errors.append(f"{where}: memory_bytes {mem} is not a positive whole number of MiB")
        cc = data.get("compute_capability")
        if isinstance(cc, str):
            try:
                major, minor = (int(x) for x in cc.split("."))
            except ValueError:
                errors.append(f"{where}: compute_capability {cc!r} is not 'major.minor'")
            else:
                if isinstance(data.get("bf16"), bool) and data["bf16"] != (major >= 8):
                    errors.append(f"{where}: bf16={data['bf16']} disagrees with compute capability {cc}")
        if isinstance(data.get("architecture"), str) and data["architecture"] not in ARCHITECTURES:
            errors.append(f"{where}: unknown architecture {data['architecture']!r}")
        over = data.get("overheads")
        if isinstance(over, dict):
            _check_keys(over, OVERHEAD_KEYS, f"{where} overheads", errors)
            for key in ("cuda_context_bytes", "workspace_bytes"):
                if _is_type(over.get(key), int) and over[key] < 0:
                    errors.append(f"{where}: overheads.{key} is negative")
            ratio = over.get("reserve_ratio")
            if _is_type(ratio, float) and not 0.0 <= ratio < 1.0:
                errors.append(f"{where}: overheads.reserve_ratio {ratio} outside [0, 1)")
    _check_names(entries, "gpu", errors)
    # NVML names identify a card: one card, one catalogue entry.
    nvml_owner: dict[str, str] = {}
    for fname, data in entries:
        for nv in data.get("nvml_names") or []:
            if not isinstance(nv, str):
                continue
            key = nv.strip().lower()
            if key in nvml_owner and nvml_owner[key] != fname:
                errors.append(f"gpu {fname}: nvml name {nv!r} also in {nvml_owner[key]}")
            nvml_owner.setdefault(key, fname)
    print(f"gpus: {len(entries)} files checked")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--models-only", action="store_true")
    group.add_argument("--gpus-only", action="store_true")
    parser.add_argument("--skip-params", action="store_true", help="schema checks only, no transformers build")
    parser.add_argument("names", nargs="*", help="model catalogue names to check (default: all)")
    args = parser.parse_args(argv)

    errors: list[str] = []
    if not args.gpus_only:
        verify_models(args.names, args.skip_params, errors)
    if not args.models_only:
        verify_gpus(errors)
    if errors:
        print(f"\nFAILED: {len(errors)} problem(s)")
        for err in errors:
            print(f"  - {err}")
        return 1
    print("\nOK: catalogue verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
