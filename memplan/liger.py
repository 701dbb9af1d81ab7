"""Liger kernels as a plan option: which kernels a plan switches on, per model family (stdlib only).

What transformers 5.24's Trainer does with ``use_liger_kernel=True`` (trainer.py ->
integrations/liger.py `apply_liger_kernel`): liger_kernel 0.8.5's
``transformers.monkey_patch._apply_liger_kernel_to_instance(model=base_model, **liger_kernel_config)``,
which calls ``apply_liger_kernel_to_<family>`` with the config's keys that family's function accepts;
the kernels a family switches on by default are that function's keyword defaults (`LIGER_DEFAULTS`,
read off the signatures). ``liger_kernel_config`` is a dict of overrides on those defaults; a plan
keeps it as a sorted tuple of ``(kernel, on)`` pairs (hashable). Families without an
``apply_liger_kernel_to_*`` function get nothing (Liger logs "no Liger kernels supported").

Kernels: ``rope``, ``rms_norm``, ``swiglu`` / ``geglu`` (the MLP), ``layer_norm``,
``fused_linear_cross_entropy`` (FLCE: the lm_head and the loss in chunks, the [tokens x vocab]
logits never exist), ``cross_entropy`` (Liger's cross-entropy on materialized logits). Liger refuses
``cross_entropy`` and ``fused_linear_cross_entropy`` together (an assert in every apply function).
"""

from __future__ import annotations

from typing import Any, Mapping

#: every kernel keyword of liger_kernel 0.8.5's apply_liger_kernel_to_* functions that memplan knows
KERNELS = ("cross_entropy", "fused_linear_cross_entropy", "geglu", "layer_norm", "rms_norm", "rope", "swiglu")

_LLAMA = frozenset({"fused_linear_cross_entropy", "rms_norm", "rope", "swiglu"})
_LLAMA_KW = _LLAMA | {"cross_entropy"}
_GEMMA = frozenset({"fused_linear_cross_entropy", "geglu", "rms_norm", "rope"})
_GEMMA_KW = _GEMMA | {"cross_entropy"}
_NO_ROPE = frozenset({"fused_linear_cross_entropy", "rms_norm", "swiglu"})

#: model_type -> (kernels on by default, kernel keywords its apply function accepts): the keyword
#: defaults of liger_kernel/transformers/monkey_patch.py apply_liger_kernel_to_<family> (0.8.5),
#: for the families memplan's catalogue has. A model_type absent here gets no Liger kernel.
LIGER_DEFAULTS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "llama": (_LLAMA, _LLAMA_KW),
    "mistral": (_LLAMA, _LLAMA_KW),
    "mixtral": (_LLAMA, _LLAMA_KW),
    "qwen2": (_LLAMA, _LLAMA_KW),
    "qwen3": (_LLAMA, _LLAMA_KW),
    "qwen3_moe": (_LLAMA, _LLAMA_KW),
    "phi3": (_LLAMA, _LLAMA_KW),
    "olmo2": (_LLAMA, _LLAMA_KW),
    "llama4": (_LLAMA | {"layer_norm"}, _LLAMA_KW | {"layer_norm"}),
    "llama4_text": (_LLAMA | {"layer_norm"}, _LLAMA_KW | {"layer_norm"}),
    "granite": (frozenset({"cross_entropy", "rms_norm", "rope", "swiglu"}), _LLAMA_KW),
    "gemma": (_GEMMA, _GEMMA_KW),
    "gemma2": (_GEMMA, _GEMMA_KW),
    "gemma3_text": (_GEMMA, _GEMMA_KW),
    "gemma3": (_GEMMA | {"layer_norm"}, _GEMMA_KW | {"layer_norm"}),
    "gpt_oss": (frozenset({"fused_linear_cross_entropy", "rms_norm", "rope"}), _LLAMA_KW),
    "deepseek_v2": (_NO_ROPE, _LLAMA_KW),
    "deepseek_v3": (_NO_ROPE, _LLAMA_KW),
}

#: (model_type, kernel) pairs liger_kernel 0.8.5 refuses (apply_liger_kernel_to_granite raises
#: NotImplementedError "LigerFusedLinearCrossEntropy is not available for Granite models.")
REFUSED = {("granite", "fused_linear_cross_entropy")}

#: axolotl's LigerPlugin keys (axolotl/integrations/liger/args.py) -> Liger's kernel keyword
AXOLOTL_KEYS = {"liger_rope": "rope", "liger_rms_norm": "rms_norm", "liger_glu_activation": "swiglu",
                "liger_layer_norm": "layer_norm", "liger_fused_linear_cross_entropy": "fused_linear_cross_entropy",
                "liger_cross_entropy": "cross_entropy"}



def norm_kernel_config(value: Any) -> tuple[tuple[str, bool], ...] | Any:
    """A `liger_kernel_config` in any accepted form -> a sorted tuple of (kernel, on) pairs.

    Accepted: a dict of overrides (TrainingArguments' form: ``{"rope": False}``), pairs, or the names
    of the kernels wanted, exactly (``"fused_linear_cross_entropy,rms_norm"`` or a list of names:
    every other kernel off). Anything else passes through for `kernel_config_problems` to report.
    """
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = [(str(k).strip().lower(), v) for k, v in value.items()]
    elif isinstance(value, str):
        names = {n.strip().lower() for n in value.split(",") if n.strip()}
        items = [(k, k in names) for k in sorted(set(KERNELS) | names)]
    elif isinstance(value, (tuple, list, frozenset, set)):
        if all(isinstance(x, (tuple, list)) and len(x) == 2 for x in value):
            items = [(str(k).strip().lower(), v) for k, v in value]
        elif all(isinstance(x, str) for x in value):
            names = {n.strip().lower() for n in value}
            items = [(k, k in names) for k in sorted(set(KERNELS) | names)]
        else:
            return tuple(value)
    else:
        return value
    if not all(isinstance(v, bool) for _, v in items):
        return tuple(items)
    return tuple(sorted(dict(items).items()))


def kernel_config_problems(config: Any) -> list[str]:
    """One line per bad `liger_kernel_config` value (the plan's problem list)."""
    if not isinstance(config, tuple) or not all(isinstance(x, tuple) and len(x) == 2 for x in config):
        return [f"--liger-kernels {config!r} is not a list of Liger kernels; use names from: {', '.join(KERNELS)} "
                "(e.g. --liger-kernels fused_linear_cross_entropy,rms_norm)"]
    p = []
    for k, v in config:
        if k not in KERNELS:
            p.append(f"--liger-kernels {k!r} is not a Liger kernel; use names from: {', '.join(KERNELS)}")
        elif not isinstance(v, bool):
            p.append(f"liger_kernel_config[{k!r}] must be true or false, got {v!r}")
    on = {k for k, v in config if v is True}
    if {"cross_entropy", "fused_linear_cross_entropy"} <= on:
        p.append("--liger-kernels: cross_entropy and fused_linear_cross_entropy cannot both be on (Liger asserts "
                 "it); keep fused_linear_cross_entropy")
    return p


def liger_kernels(model_type: str, use_liger_kernel: bool, config: tuple[tuple[str, bool], ...]) -> frozenset[str]:
    """The kernels `_apply_liger_kernel_to_instance` switches on for a model of `model_type`: the family's
    defaults with the config's overrides (only keywords its apply function accepts; others are dropped
    as Liger drops them). Empty when Liger is off or the family has no Liger support."""
    if not use_liger_kernel or model_type not in LIGER_DEFAULTS:
        return frozenset()
    on, accepted = LIGER_DEFAULTS[model_type]
    on = set(on)
    for k, v in config:
        if k in accepted:
            (on.add if v else on.discard)(k)
    return frozenset(on)


def kernel_kwargs(config: tuple[tuple[str, bool], ...]) -> dict[str, bool]:
    """The plan's `liger_kernel_config` as TrainingArguments' dict (kwargs of the apply function)."""
    return dict(config)


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def flce_chunk_tokens(tokens: int, vocab: int, hidden: int, chunk_mem_const: int = 1) -> int:
    """Rows of one FLCE logits chunk: liger_kernel 0.8.5 ops/fused_linear_cross_entropy.py
    `fused_linear_cross_entropy_forward`: inc_factor = cdiv(V, chunk_mem_const*H), chunk_size =
    min(next_power_of_2(cdiv(BT, inc_factor)), BT) -- transient logits bounded by about BT x H elements.
    E.g. Llama 3 (V 128,256, H 4,096), 4,096 tokens: inc_factor 32, chunk 128 rows."""
    inc = -(-vocab // (chunk_mem_const * hidden))
    return min(next_power_of_2(-(-tokens // inc)), tokens)


#: families whose decoder layer the closed form walks with Liger's layer kernels (rope, rms_norm,
#: swiglu), checked against simulate (tests/test_liger.py); elsewhere a plan with layer kernels on
#: falls back to simulate (estimate.check_plan)
WALKED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})
#: kernels that change the decoder layer (the rest change the loss: fused_linear_cross_entropy,
#: cross_entropy)
LAYER_KERNELS = frozenset({"rope", "rms_norm", "swiglu", "geglu", "layer_norm"})


def layer_kernels(model: Any, plan: Any) -> frozenset[str]:
    """The Liger layer kernels the closed form walks for `model` under `plan` (empty unless the family is
    in WALKED_FAMILIES)."""
    if not plan.use_liger_kernel or model.model_type not in WALKED_FAMILIES:
        return frozenset()
    return liger_kernels(model.model_type, True, plan.liger_kernel_config) & LAYER_KERNELS
