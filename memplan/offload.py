"""Activation offloading (TRL `activation_offloading`) and checkpoint offloading (axolotl
`gradient_checkpointing: offload`): which saved tensors live in host memory at each moment of a step.

TRL 1.16 (`trl/models/activation_offloading.py`, `OffloadActivations`, from torchtune; used by
`SFTTrainer.training_step` around forward and backward) is a `saved_tensors_hooks`: every tensor
autograd saves that is on the accelerator, has at least 1024 bytes (`min_offload_size`) and is not a
parameter (nor shares a parameter's storage) is copied to host memory when saved, and brought back
(`.to(accelerator)`) when backward unpacks it. lm_head's own saved tensors stay (a `NoOpManager`
around it). With gradient checkpointing (non-reentrant, the HF default) the hooks see only what is
saved outside the checkpointed layers -- the layers' inputs (torch saves them as SavedVariables),
the final norm's and the loss's tensors -- while the recomputation saves through checkpoint's own
hooks. axolotl's `gradient_checkpointing: offload` (src/axolotl/utils/gradient_checkpointing/unsloth.py,
`Unsloth_Offloaded_Gradient_Checkpointer`, an autograd.Function) copies each decoder layer's input
to the host (`hidden_states.to("cpu")`, saved in its ctx), runs the layer under no_grad, and in
backward brings the input back (`.to("cuda")`), recomputes the whole layer (reentrant-style: no early
stop) and runs its backward: only the layers' inputs move; its backward hard-codes "cuda", so it is
modelled from that source and not checked on a real step here.

A moment's device activations lose what sits on the host then; `host` gets it (`Term` keys, the
host contract of DESIGN.md). Rules, measured on real CPU steps under TRL's real hooks
(memplan/runtime/offload.py, tests/test_offload.py):
- a layer input that is a leaf (layer 0's, when the frozen embedding's output is made to require
  grad: `enable_input_require_grads`, set with checkpointing) stays on the device as well: its
  AccumulateGrad node keeps it; its host copy exists beside it;
- checkpointing: at the loss stage every layer's input is on the host; while layer i runs backward,
  the inputs of the layers below it are; layer i's own input is brought back (CUDA: a device copy, the
  host copy freed; CPU: `.to("cpu")` returns the host copy itself, which backward then uses);
- no checkpointing: every layer's saved set goes to the host as it is saved; autocast's cached
  16-bit LoRA weight copies stay on the device until the forward ends (the cache holds them); while
  layer i runs backward the layers below it are on the host, its own tensors back on the device
  (CUDA) or used from the host (CPU).
Known limitations (NB): without checkpointing, the last layer's forward (the peak when the
vocabulary is small) takes the walk's peak moment, a little after the real one: the host bytes the
running layer has packed by then are over-counted (+7 % measured on a tiny Llama; the device bytes
agree to 1 KB); the final norm's and the loss's saved tensors (packed too, several are packed twice in
TRL's one-stream mode) are counted where the step without offloading has them; tensors under 1024
bytes are counted as offloaded; TRL's default on CUDA is two streams (`use_streams=True`): up to 5
recent tensors wait on the device in its forward stash and one autograd node's brought-back tensors
stay while the next runs, which is not counted; pinned host memory is counted at its logical size
(CUDA's pinned-memory allocator rounds blocks up to a power of two).
"""

from __future__ import annotations

from typing import Any

from .activations import FUSED_4BIT_MAX_TOKENS, LayerModel, Lin, Sym, Walk, layer_trace, sdpa_masked
from .model import ModelSpec
from .plan import TrainPlan, shape_free_cache
from .terms import Term


NOTE = ("activation offloading: saved tensors of at least 1024 B move to host memory (the `host` result) as "
        "TRL's OffloadActivations does, one stream; the device/host split is checked on real CPU steps and "
        "simulate, not yet on a GPU (TRL's default two streams keep a few more tensors on the device)")


def offloads(plan: Any) -> bool:
    """Whether the plan moves saved tensors to the host."""
    return bool(plan.activation_offloading or plan.checkpoint_offload)


def _leaf_first(plan: Any) -> bool:
    """Layer 0's input is a leaf that requires grad (kept on the device by its AccumulateGrad node)."""
    return plan.gradient_checkpointing and plan.method != "full"


def _norm_packs(s: Any) -> int:
    """Bytes one RMSNorm (over [T x H], input requiring grad) packs beyond its saved set: pow and mul
    both save x.to(float32), rsqrt and mul both save rsqrt, and one stream packs each save apart."""
    return s.r(s.tokens * s.model.hidden_size * 4) + s.r(4 * s.tokens)


def _layer_packs(s: Any, first: bool) -> int:
    """Host bytes one layer's saved set takes without checkpointing (one stream: every save packed
    apart): its saved set, the norms' second packs, cos and sin packed once more for q and for k."""
    ap = s.ap
    norms = 1 if first else 2  # layer 0's input norm saves nothing (its input needs no grad)
    return (ap.first_layer_bytes if first else ap.layer_bytes) + norms * _norm_packs(s) + 2 * ap.rope_bytes


def split(s: Any, m: Any) -> tuple[Any, dict[str, int]]:
    """Moment `m` of step `s` with offloading: (the moment with its device activations, host bytes by term)."""
    plan, ap, L = s.plan, s.ap, s.model.num_layers
    cpu = plan.device == "cpu"
    if m.kind in ("optimizer",):
        return m, {}
    logits = 0         # the log-softmax output used from its host copy (CPU loss backward)
    host_logits = 0    # the log-probabilities' host copies
    axolotl = plan.checkpoint_offload and not plan.activation_offloading
    if plan.gradient_checkpointing:
        X = ap.layer_input_bytes
        leaf = _leaf_first(plan)
        if m.layer is None:                       # the loss stage: every layer's input packed
            n_host, n_dev = L, L - leaf
        elif axolotl:                             # its ctx keeps the host copy until the layer is done;
            i = m.layer                           # backward works on a device copy (`.to("cuda")`)
            n_host, n_dev = i + 1, max(i - leaf, 0)
        else:                                     # layer i's backward: the inputs below it, and its own
            i = m.layer
            n_host = i + (1 if cpu else 0)
            n_dev = max(i - leaf, 0) + (1 if cpu and (i > 0 or not leaf) else 0)
        host, off = n_host * X, n_dev * X
        if axolotl:                               # only the layers' inputs move
            off = min(off, m.activations)
            moved = m._replace(activations=m.activations - off, allocated_bytes=m.allocated_bytes - off)
            return moved, ({str(Term.ACTIVATIONS): host} if host else {})
    else:
        first, rest = ap.first_layer_bytes, ap.layer_bytes
        below = lambda n: (first + (n - 1) * rest) if n > 0 else 0  # noqa: E731
        packs = lambda n: (_layer_packs(s, True) + (n - 1) * _layer_packs(s, False)) if n > 0 else 0  # noqa: E731
        if m.kind in ("forward", "loss_forward"):
            total, temps, packed, copies, copies_first = forward_peak(s)
            kept = lambda n: (copies_first + (n - 1) * copies) if n > 0 else 0  # noqa: E731
        if m.kind == "forward":
            # the last layer's forward: the layers below on the host; autocast's cache keeps every 16-bit
            # LoRA weight copy of theirs; the model's loop keeps the embedding output (`inputs_embeds`)
            cached = (L - 1) * (ap.lora_weight_copies // L)
            embeds = ap.layer_input_bytes if L > 1 else 0
            acts = cached + embeds + ap.rope_bytes + ap.embed_leaf_bytes + ap.mask_bytes + total - temps
            moved = m._replace(activations=acts, temporaries=temps,
                               allocated_bytes=m.allocated_bytes - m.activations - m.temporaries + acts + temps)
            host = packs(L - 1) + packed
            return moved, ({str(Term.ACTIVATIONS): host} if host else {})
        if m.kind == "loss_forward":
            host, off = packs(L), below(L) - kept(L)
        elif m.kind == "loss_backward":
            host, off = packs(L), below(L)
        else:
            i = m.layer
            host, off = packs(i), below(i)
            if cpu:  # the layer's own tensors still saved are the host copies backward uses
                own = max(m.activations - _fixed_no_gc(s, i), 0)
                host, off = host + own, off + own
    if m.layer is None:  # the loss stage: the final norm's saved tensors are packed (twice each)
        host += 2 * _norm_packs(s)
        off += ap.final_norm_bytes
        # log_softmax and nll_loss each pack the log-probabilities, nll_loss its labels: on the host
        # when the loss is made (the device peak of the loss forward: its output comes last). In
        # backward the CPU uses the host copies (a device-side logits buffer less); on CUDA each comes
        # back to the device as its node runs and its host copy goes
        tv4 = s.r(4 * s.tokens * s.model.vocab_size)
        if m.kind == "loss_forward" or cpu:
            host += 8 * s.tokens
            host_logits = 2 * tv4
        logits = tv4 if m.kind == "loss_backward" and cpu else 0
    off = min(off, m.activations)
    moved = m._replace(activations=m.activations - off, logits=m.logits - logits,
                       allocated_bytes=m.allocated_bytes - off - logits)
    out = {str(Term.ACTIVATIONS): host} if host else {}
    if host_logits:
        out[str(Term.LOGITS)] = host_logits
    return moved, out


def _fixed_no_gc(s: Any, i: int) -> int:
    """Without checkpointing: the activations of layer i's backward moments that are not saved by the
    layers (cos/sin, ids, masks, the layers below), as `estimate.layer_backward_state` counts them."""
    ap = s.ap
    first, rest = ap.first_layer_bytes, ap.layer_bytes
    below = (first + (i - 1) * rest) if i > 0 else 0
    return below + ap.rope_bytes + ap.embed_leaf_bytes + s.layer_args + s.small + (i + 1) * s.rng_state


class _OffloadWalk(Walk):
    """A layer walk under offloading hooks: a saved tensor leaves the device as soon as the layer lets
    go of it (its host copy was made when it was saved); autocast's cached weight copies (sizes that do
    not depend on the shape) stay, the cache holds them. `host[k]`: bytes packed by moment k."""

    def __init__(self) -> None:
        super().__init__()
        self.host: list[Lin] = []
        self.held: set[int] = set()  # storages the caller holds (the layer's input: the model's loop)

    def hold(self, *ts: Sym) -> None:
        super().hold(*ts)
        self.host.append(self.saved_bytes)

    def mark(self, transient: "Lin | int" = 0) -> None:
        super().mark(transient)
        self.host.append(self.saved_bytes)

    def drop(self, *ts: Sym) -> None:
        for t in ts:
            n = t.nbytes
            if t.sid in self.saved and t.sid in self.live and (n.t or n.s or n.q) and t.sid not in self.held:
                self.live_bytes = self.live_bytes - self.live.pop(t.sid)
                self.gone[t.sid] = (len(self.moments), self.born.get(t.sid, 0) in self.frames)
        super().drop(*ts)


@shape_free_cache()
def forward_trace(model: ModelSpec, plan: TrainPlan, flags: tuple[bool, bool, bool]) -> tuple[Any, ...]:
    """A layer's forward (layers >= 1) under offloading: candidate peaks as coefficient triples
    (total, temporaries, host bytes packed so far), and the LoRA weight copies a layer >= 1 and layer
    0 save (`activations.layer_trace`'s `copies`, `copies_first`)."""
    cpu, fused, masked = flags
    a = plan.precision.params
    w = _OffloadWalk()
    lm = LayerModel(model, plan, w, cpu, fused, masked)
    x = w.new(Lin(t=1) * model.hidden_size, a, True)
    w.held.add(x.sid)
    lm.layer(x, 4 if model.arch.rope_fp32 else a)
    cands: dict[tuple[int, ...], tuple[Any, ...]] = {}
    for k, (total, temps) in enumerate(w.split(len(w.moments))):
        cands.setdefault(total.key(), (_coef(total), _coef(temps), _coef(w.host[k])))
    tr = layer_trace(model, plan, flags)
    return tuple(cands.values()), tr.copies, tr.copies_first


def _coef(x: Lin) -> tuple[int, int, int]:
    """(tokens, B*S^2, constant) coefficients, as `activations.LayerTrace` keeps sizes."""
    return (x.t + x.s, x.q, x.c)


def _at(c: tuple[int, int, int], T: int, BSS: int) -> int:
    return c[0] * T + c[1] * BSS + c[2]


def forward_peak(s: Any) -> tuple[int, int, int, int, int]:
    """(device total, temporaries, host packed) of the last layer's forward under offloading at
    `s`'s shape, and the LoRA weight copies one layer >= 1 and layer 0 keep in autocast's cache."""
    plan = s.plan
    T = s.tokens
    cpu = plan.device == "cpu"
    flags = (cpu, not cpu and plan.method == "qlora" and T <= FUSED_4BIT_MAX_TOKENS, sdpa_masked(s.model, plan))
    cands, copies, copies_first = forward_trace(s.model, plan, flags)
    BSS = T * plan.seq_len
    best = max(cands, key=lambda c: _at(c[0], T, BSS))
    return (_at(best[0], T, BSS), _at(best[1], T, BSS), _at(best[2], T, BSS), _at(copies, T, BSS),
            _at(copies_first, T, BSS))
