"""Which checkpoint a profile loads; `memplan.runtime.load.load_model` (the one loader) loads it.

`weights="random"`: memory does not depend on weight values, so a checkpoint of random weights is
written once per (config, dtype) into a cache folder and loaded through the real `from_pretrained`
path (safetensors shards of at most 5 GB, as hub checkpoints are). Writing it is fast even for an
8B-shaped model: the model is built on the meta device, materialised uninitialised on the CPU
(`Module.to_empty`), filled with a tiled N(0, 0.02) block (memory-bandwidth bound, no per-element
RNG) and saved with `save_pretrained`, which handles tied weights.

`weights="pretrained"`: the real checkpoint from a local folder or the hub (`source`).

Cache folder: $MEMPLAN_CACHE_DIR, else $XDG_CACHE_HOME/memplan, else ~/.cache/memplan; each
checkpoint is written into a temporary folder and renamed into place, so a killed run never leaves a
half-written checkpoint that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..plan import TrainPlan

_FILL_BLOCK = 1 << 20


def cache_root() -> Path:
    env = os.environ.get("MEMPLAN_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "memplan"


def tmp_prefix() -> str:
    """The prefix of this process's half-written checkpoints (removed on Ctrl-C, see memplan.cli)."""
    return f".tmp-{os.getpid()}-"


def checkpoint_notice(config: dict[str, Any], dtype: str, seed: int, params: int) -> str | None:
    """What `random_checkpoint` will write, said before it writes it; None when it is cached."""
    root = cache_root() / "random-weights"
    final = root / f"{config.get('model_type', 'model')}-{dtype}-{_key(config, dtype, seed)}"
    if (final / ".complete").is_file():
        return None
    size = params * (4 if dtype == "fp32" else 2)
    amount = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
    return (f"will write a random-weight checkpoint of ~{amount} ({params:,} params, {dtype}) "
            f"to {final} (the cache: $MEMPLAN_CACHE_DIR; reused by later runs, delete it to reclaim the space)")


def _key(config: dict[str, Any], dtype: str, seed: int) -> str:
    import transformers

    blob = json.dumps({"config": config, "dtype": dtype, "seed": seed, "transformers": transformers.__version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def random_checkpoint(config: dict[str, Any], dtype: str = "bf16", seed: int = 0,
                      progress: Any = None) -> Path:
    """A folder with config.json and random safetensors weights for `config` (cached)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..runtime.load import TORCH_DTYPE, hf_config

    root = cache_root() / "random-weights"
    final = root / f"{config.get('model_type', 'model')}-{dtype}-{_key(config, dtype, seed)}"
    if (final / ".complete").is_file():
        return final
    if progress:
        progress(f"writing a random-weight checkpoint to {final}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(), dir=root))
    try:
        cfg = hf_config(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=TORCH_DTYPE[dtype])
        model.to_empty(device="cpu")
        g = torch.Generator().manual_seed(seed)
        block = (torch.randn(_FILL_BLOCK, generator=g) * 0.02)
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if not t.is_floating_point():
                    t.zero_()
                    continue
                flat = t.view(-1)
                b = block.to(t.dtype)
                for i in range(0, flat.numel(), _FILL_BLOCK):
                    n = min(_FILL_BLOCK, flat.numel() - i)
                    flat[i:i + n].copy_(b[:n])
        model.save_pretrained(tmp, max_shard_size="5GB")
        del model
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not (final / ".complete").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def checkpoint_path(config: dict[str, Any], plan: TrainPlan, weights: str = "random", source: str | None = None,
                    seed: int = 0, progress: Any = None) -> str:
    """The folder (or hub id) to load for `weights`: the cached random checkpoint, or `source`."""
    from ..errors import MemplanError

    if weights == "random":
        return str(random_checkpoint(config, plan.dtype, seed, progress=progress))
    if weights == "pretrained":
        if not source:
            raise MemplanError("--weights pretrained needs a hub id or a local folder with weights as MODEL")
        return source
    raise MemplanError(f"--weights {weights!r} is not one of: random, pretrained")

