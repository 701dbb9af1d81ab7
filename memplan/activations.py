"""What a training step keeps alive: a symbolic walk of one decoder layer and of the model's ends.

Instead of one closed formula per regime, the walk follows the ops that transformers 5.24, peft 0.21
and bitsandbytes 0.50 run (FACTS.md) on symbolic tensors that know their size, dtype, storage and
whether they require grad. It records what autograd saves for backward and which locals are alive
at each moment of a layer's forward, so q/k/v sharing one saved input, dropout masks, autocast
copies, fused projections and the dequantized-weight transients fall out of a few rules. It is plain
integer arithmetic: a layer walk costs tens of microseconds.

The three regimes of FACTS.md are special cases: R1 prepare without autocast (fp32 stream and
adapters); R2 prepare + bf16 autocast (the HF Trainer default); R3 no prepare, 16-bit model, fp32
LoRA, no autocast.

Family flags read off the architecture row (memplan/arch.py): olmo2's post norms (no norm on the
sublayer inputs, q/k norms over whole projections, fp32 rotary cos/sin) walk `_post_norm_layer`;
granite's residual multiplier makes one more tensor per sublayer (`_scaled`).

Known limitations (NB): eager attention and Gemma-2 soft-capping are modelled op by op but not
checked against a real step. Mixture-of-experts blocks (`LayerModel._moe`) follow transformers'
grouped_mm experts and peft's ParamWrapper op by op.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple
from itertools import count

from .formulas import BNB_BLOCKSIZE, expert_targets, lora_shapes, lora_targets, moe_lora_shapes
from .liger import layer_kernels
from .model import Linear, ModelSpec
from .plan import TrainPlan, shape_free_cache
from .units import round_up

_ids = count()

#: bitsandbytes CUDA `gemm_4bit`: dequantize + F.linear past this many tokens, the fused kernel below
FUSED_4BIT_MAX_TOKENS = 1536


class Lin:
    """A size that is linear in the step's shape: t*T + s*B*S + q*B*S^2 + c.

    T = batch * seq tokens; B*S rows appear in attention's logsumexp, B*S^2 in eager attention's
    probabilities. A layer is walked once per model and plan with symbolic sizes; evaluating the
    result for a batch and sequence length is then a few multiplications.
    """

    __slots__ = ("t", "s", "q", "c")

    def __init__(self, t: int = 0, s: int = 0, q: int = 0, c: int = 0):
        self.t, self.s, self.q, self.c = t, s, q, c

    @staticmethod
    def of(x: "Lin | int") -> "Lin":
        return x if isinstance(x, Lin) else Lin(c=x)

    def __add__(self, o: "Lin | int") -> "Lin":
        o = Lin.of(o)
        return Lin(self.t + o.t, self.s + o.s, self.q + o.q, self.c + o.c)

    __radd__ = __add__

    def __sub__(self, o: "Lin | int") -> "Lin":
        o = Lin.of(o)
        return Lin(self.t - o.t, self.s - o.s, self.q - o.q, self.c - o.c)

    def __mul__(self, k: int) -> "Lin":
        return Lin(self.t * k, self.s * k, self.q * k, self.c * k)

    __rmul__ = __mul__

    def at(self, T: int, BS: int, BSS: int) -> int:
        return self.t * T + self.s * BS + self.q * BSS + self.c

    def key(self) -> tuple[int, int, int, int]:
        return (self.t, self.s, self.q, self.c)

    def __repr__(self) -> str:
        return f"Lin(t={self.t}, s={self.s}, q={self.q}, c={self.c})"


def envelope(cands: list[tuple[Lin, Lin]]) -> tuple[tuple[Lin, Lin], ...]:
    """The (total, temporaries) candidates whose total can be the maximum for some shape (drop those
    dominated everywhere; of equal totals, the first)."""
    uniq: dict[tuple[int, int, int, int], tuple[Lin, Lin]] = {}
    for c in cands:
        uniq.setdefault(c[0].key(), c)
    keys = list(uniq)
    keep = [k for k in keys if not any(o != k and all(a >= b for a, b in zip(o, k)) for o in keys)]
    return tuple(uniq[k] for k in keep)


@dataclass(eq=False)
class Sym:
    """A symbolic tensor: `numel` elements of `dt` bytes in storage `sid` of `nbytes`."""

    numel: Lin
    dt: int
    sid: int
    nbytes: Lin
    rg: bool = True


@dataclass
class Walk:
    """Liveness bookkeeping over symbolic tensors.

    `saved`: storages autograd keeps for backward. `live`: every storage alive now (saved ones and
    locals still referenced). `moments`: the live total at every allocation and `mark` (plus the
    transient bytes named there) -- the peak is their maximum for a given shape.
    `last_save`: how many moments had passed when the last tensor was saved -- a checkpointed
    layer's recompute stops there (torch's non-reentrant early stop).
    NB: sizes inside a layer are not rounded to 512 B on CUDA (each tensor is off by < 512 B).
    """

    live: dict[int, Lin] = field(default_factory=dict)
    saved: set[int] = field(default_factory=set)
    live_bytes: Lin = field(default_factory=Lin)
    saved_bytes: Lin = field(default_factory=Lin)
    moments: list[Lin] = field(default_factory=list)
    last_save: int = 0
    copies: Lin = field(default_factory=Lin)  # saved autocast copies of LoRA weights
    unsaved_at_last_save: Lin = field(default_factory=Lin)  # live locals when the last tensor was saved
    # module frames, to tell activations from temporaries as the tracker does (`split`)
    frames: list[int] = field(default_factory=lambda: [0])
    born: dict[int, int] = field(default_factory=dict)                 # sid -> frame that made it
    gone: dict[int, tuple[int, bool]] = field(default_factory=dict)    # sid -> (time freed, inside its frame)
    sizes: dict[int, Lin] = field(default_factory=dict)
    snapshots: list[tuple[tuple[int, ...], Lin]] = field(default_factory=list)  # per moment: live sids, transient
    #: storages made with grad mode off (inside an autograd.Function's forward: FlashAttention-2's output,
    #: softmax_lse, rng_state): the tracker counts them as temporaries when a recompute (backward) makes them
    nograd: set[int] = field(default_factory=set)

    @contextmanager
    def frame(self) -> Iterator[None]:
        """An nn.Module call: what is made inside and freed before it returns is a temporary."""
        self.frames.append(next(_ids))
        try:
            yield
        finally:
            self.frames.pop()

    def new(self, numel: "Lin | int", dt: int, rg: bool = True) -> Sym:
        """A fresh tensor, alive (held) from now on."""
        numel = Lin.of(numel)
        t = Sym(numel, dt, next(_ids), numel * dt, rg)
        self.born[t.sid] = self.frames[-1]
        self.sizes[t.sid] = t.nbytes
        self.hold(t)
        return t

    def view(self, t: Sym, numel: "Lin | int") -> Sym:
        return Sym(Lin.of(numel), t.dt, t.sid, t.nbytes, t.rg)

    def cast(self, t: Sym, dt: int) -> Sym:
        return t if t.dt == dt else self.new(t.numel, dt, t.rg)

    def hold(self, *ts: Sym) -> None:
        for t in ts:
            if t.sid not in self.live:
                self.live[t.sid] = t.nbytes
                self.live_bytes = self.live_bytes + t.nbytes
        self.moments.append(self.live_bytes)  # every allocation may be the peak
        self.snapshots.append((tuple(self.live), Lin()))

    def drop(self, *ts: Sym) -> None:
        for t in ts:
            if t.sid in self.live and t.sid not in self.saved:
                self.live_bytes = self.live_bytes - self.live.pop(t.sid)
                self.gone[t.sid] = (len(self.moments), self.born.get(t.sid, 0) in self.frames)

    def save(self, *ts: Sym) -> None:
        for t in ts:
            self.hold(t)
            if t.sid not in self.saved:
                self.saved.add(t.sid)
                self.saved_bytes = self.saved_bytes + t.nbytes
        self.last_save = len(self.moments)
        self.unsaved_at_last_save = self.live_bytes - self.saved_bytes

    def mark(self, transient: "Lin | int" = 0) -> None:
        self.moments.append(self.live_bytes + transient)
        self.snapshots.append((tuple(self.live), Lin.of(transient)))

    def nograd_bytes(self) -> Lin:
        """Saved bytes made with grad mode off (`nograd`)."""
        return sum((self.sizes[sid] for sid in self.nograd if sid in self.saved), Lin())

    def split(self, limit: int, recompute: bool = False) -> list[tuple[Lin, Lin]]:
        """(live total, temporaries) at each of the first `limit` moments.

        The tracker's rule (memplan's runtime tracker): a tensor made during forward (or a
        recompute) is a temporary when it is freed before the module call that made it returns,
        else an activation. Frees after `limit` never happen before the step moves on: a
        checkpointed recompute stops at its last save (torch raises to stop it; the frames then
        unwind with their tensors still referenced by the traceback), so they count as activations.
        The transient bytes of a `mark` (a dequantized weight, a pow) are temporaries. `recompute`:
        the moments of a recompute (backward phase), where storages made with grad mode off count as
        temporaries too (`nograd`).
        """
        out = []
        for k in range(min(limit, len(self.moments))):
            sids, temps = self.snapshots[k]
            for sid in sids:
                g = self.gone.get(sid)
                if (g is not None and g[1] and g[0] <= limit) or (recompute and sid in self.nograd):
                    temps = temps + self.sizes[sid]
            out.append((self.moments[k], temps))
        return out


def _promote(a: int, b: int) -> int:
    return max(a, b)


def _half(n: "Lin | int") -> Lin:
    """Half of a symbolic element count (the even or odd rotary lanes)."""
    x = Lin.of(n)
    return Lin(x.t // 2, x.s // 2, x.q // 2, x.c // 2)


class LayerModel:
    """Walks one decoder layer of `model` under `plan` (T tokens, B sequences of S)."""

    def __init__(self, model: ModelSpec, plan: TrainPlan, walk: Walk, cpu: bool, fused: bool = False,
                 masked: bool = False, varlen: bool = False):
        self.m, self.p, self.w, self.cpu, self.fused, self.masked = model, plan, walk, cpu, fused, masked
        self.varlen = varlen  # FlashAttention-2 on a packed row: the varlen path (`_flash`)
        self.T = Lin(t=1)  # tokens, symbolic: the walk is shape-independent
        pr = plan.precision
        self.ac = pr.autocast  # autocast dtype bytes (bf16/fp16 both 2), 0 = off
        self.cd = pr.compute
        self.weights_dt = pr.params
        self.quantized = plan.method == "qlora"
        self.full = plan.method == "full"
        self.adapter_dt = pr.adapter
        self.r = plan.lora_r
        self.dropout = plan.lora_dropout if plan.method in ("qlora", "lora") else 0.0
        #: FSDP1 use_orig_params (a rank's step, `distributed.rank_moments`): peft reads lora_A's dtype off the
        #: sharded fp32 original parameter (`_cast_input_dtype`), FSDP's mixed precision casts the input back
        self.orig_params = (plan.fsdp_use_orig_params and plan.fsdp_version == 1
                            and plan.method in ("qlora", "lora"))
        self.lins = {l.name.rsplit(".", 1)[-1]: l for l in model.layer_linears}
        self.targets = {lin.name for lin in lora_targets(model, plan)}
        self.down_saved, self.prod_dt, self.saved_before_down = Lin(), 0, Lin()
        self.down_out_dt = 0
        self.saved_at_probs = Lin()  # eager: what the layer has saved once the softmax output is saved
        self.expert_targets = expert_targets(model, plan)
        self.probs_dt = 4  # eager attention's softmax output dtype (transformers: softmax(dtype=float32))
        self.moe_late, self.moe_mid, self.moe_act, self.moe_tail = Lin(), Lin(), Lin(), Lin()
        self.moe_dt, self.moe_sw_dt = 0, 4
        self.moe_stale = self.moe_stale_shared = Lin()
        self.nope = False  # Llama 4: walk a NoPE layer (no rotary, no qk norm; temperature tuning)
        self.leaf_sid = -1  # the layer input when it is a leaf (a checkpointed layer's recompute)
        self.cast_cache: dict[int, Sym] = {}
        #: Liger's layer kernels the plan switches on for this family (memplan/liger.py `layer_kernels`)
        self.liger = layer_kernels(model, plan)
        self.flash_dt = 2  # FlashAttention-2's input dtype (`_flash`)

    # ---- targets ---------------------------------------------------------------------------------
    def targeted(self, lin: Linear) -> bool:
        return lin.name in self.targets

    def fused_kernel(self, lin: Linear) -> bool:
        """Whether the 4-bit forward runs bitsandbytes' fused kernel (output only, no dequantized W).

        CUDA `gemm_4bit` (backends/cuda/ops.py): for at most 1536 tokens and an inner dimension that
        is a multiple of the block size; beyond, dequantize + F.linear. The walk for few tokens on
        CUDA is the `fused` one (see `activation_profile`). NB: below 1536 tokens bitsandbytes asks a
        per-architecture heuristic that sometimes picks dequantize + F.linear: assumed fused, as
        `simulate` assumes.
        """
        return self.fused and self.p.quant != "int8" and lin.in_features % BNB_BLOCKSIZE == 0

    # ---- blocks ------------------------------------------------------------------------------------
    def norm(self, x: Sym, dim: int, rows: int) -> Sym:
        with self.w.frame():  # the RMSNorm module
            return self._norm(x, dim, rows)

    def _norm(self, x: Sym, dim: int, rows: int) -> Sym:
        """RMSNorm over `dim` for `rows` vectors (llama: weight * h.to(in); gemma: h * (1 + w)).

        x.to(float32) and rsqrt are saved when x needs grad (pow and mul save them); the output is
        a fresh tensor held by the caller.
        """
        w = self.w
        if "rms_norm" in self.liger:
            return self._liger_norm(x, rows)
        x32 = w.cast(x, 4)
        w.mark(x.numel * 4)  # pow(2)
        rs = w.new(rows, 4, x.rg)
        if x.rg:
            w.save(x32, rs)
        h = w.new(x.numel, 4, x.rg)
        if self.m.arch.gemma_norm or self.m.arch.norm_cast_last:
            # gemma: h * (1 + w.float()); olmo2, gpt_oss: (w * h).to(input_dtype) -- the product fp32, cast last
            if x.rg and self.m.arch.gemma_norm:
                w.save(w.new(dim, 4, False))  # (1 + weight.float()) is a fresh tensor, saved by the mul
            if self.full and x.rg:
                w.save(h)  # NB: the weight's grad needs the normalised h
            o = w.new(x.numel, 4, x.rg)
            out = w.cast(o, x.dt)
            w.drop(*{x32, rs, h, o} - {out, x})
            return out
        hc = w.cast(h, x.dt)
        if self.full and x.rg:
            w.save(hc)
        out = w.new(x.numel, _promote(self.weights_dt, x.dt), x.rg)
        w.drop(x32, rs, h, hc)
        return out

    def _liger_norm(self, x: Sym, rows: int) -> Sym:
        """Liger's RMSNorm (liger_kernel 0.8.5 ops/rms_norm.py `LigerRMSNormFunction`, casting mode
        "llama"): `rms_norm_forward` makes Y = empty([rows, dim], x.dtype) and RSTD = empty(rows, fp32),
        the Triton kernel fills them; ctx saves X (a view of the input) and RSTD. Backward writes dX
        into dY in place (in_place=True)."""
        w = self.w
        out = w.new(x.numel, x.dt, x.rg)
        rs = w.new(rows, 4, x.rg)
        w.nograd.update((out.sid, rs.sid))
        if x.rg:
            w.save(x, rs)
        else:
            w.drop(rs)
        return out

    def linear(self, x: Sym, lin: Linear) -> Sym:
        """A Linear module call: peft's LoRA layer wrapping the base layer, or the base layer alone."""
        with self.w.frame():
            if not self.targeted(lin):
                return self._base(x, lin)
            with self.w.frame():
                res = self._base(x, lin)
            return self._lora(x, lin, res)

    def _base(self, x: Sym, lin: Linear) -> Sym:
        """A base Linear (4-bit, 8-bit or 16-bit) and its LoRA adapter, as peft runs them.

        The caller holds `x`; the result comes back held.
        """
        w, T, cd = self.w, self.T, self.cd
        n_out = T * lin.out_features
        if self.quantized:
            # bnb Linear4bit: x.to(compute dtype); dequantize W (fp32 absmax first with double quant);
            # F.linear; .to(x dtype). Nothing is saved for the frozen weight.
            xc = w.cast(x, cd)
            if not self.fused_kernel(lin):
                nb = -(-lin.numel // BNB_BLOCKSIZE)
                # double quant: the fp32 absmax, dequantized first (CUDA's fallback keeps it and its
                # offset-added copy: backends/cuda/ops.py _dequant_linear_fallback). F.linear's output
                # is made while they are alive; NB: the runtime tracker sees that moment's output as a
                # temporary in every regime (measured), so it is counted with the transients here.
                absmax = 4 * nb * (1 if self.cpu else 2) if self.p.double_quant and self.p.quant != "int8" else 0
                w.mark(lin.numel * cd + absmax + n_out * cd)
            oc = w.new(n_out, cd, x.rg)  # F.linear's output
            res = w.cast(oc, x.dt)
            w.drop(*{xc, oc} - {x, res})
        else:
            wdt = self.weights_dt
            if self.ac:
                xc = w.cast(x, self.ac)
                wc = w.new(lin.numel, self.ac, False) if wdt != self.ac else None
                if self.full:
                    w.save(xc, *([wc] if wc else []))
                elif x.rg and wc is not None:
                    w.save(wc)  # frozen W's autocast copy, saved for dX
                res = w.new(n_out, self.ac, True)
                w.drop(*{xc, *([wc] if wc else [])} - {x})
            else:
                if self.full:
                    w.save(w.cast(x, wdt))
                res = w.new(n_out, _promote(wdt, x.dt), x.rg or self.full)
        return res

    def _lora(self, x: Sym, lin: Linear, res: Sym) -> Sym:
        """result + lora_B(lora_A(dropout(x))) * scaling (peft LoRA Linear / Linear4bit forward).

        peft casts x to the adapter dtype (fp32) and the LoRA output back to the result's dtype
        ("conversion") in lora.Linear always, and in Linear4bit when `torch.is_autocast_enabled()`
        -- asked without a device, i.e. about CUDA -- is False: always on the CPU, never under CUDA
        autocast. Under autocast the LoRA matmuls then run in bf16 on a cast of that input.
        """
        w, T, r, n_out, ac = self.w, self.T, self.r, self.T * lin.out_features, self.ac
        if self.quantized and self.p.quant != "int8":  # peft Linear4bit defensively clones the base output
            c = self.last_clone = w.new(n_out, res.dt, x.rg)
            w.drop(res)
            res = c
        conv = not self.quantized or not ac or self.cpu
        mm_dt = ac or self.adapter_dt  # dtype of the LoRA matmuls and their outputs
        xa = w.cast(x, self.adapter_dt) if conv else x
        if conv and self.orig_params:
            # FSDP1 use_orig_params: peft's `_cast_input_dtype(x, lora_A.weight.dtype)` (tuners/lora/bnb.py
            # Linear4bit.forward, layer.py Linear.forward) reads lora_A's dtype while lora_A (its own FSDP unit under
            # peft's wrap policy) is resharded and its original parameter is a view of the fp32 shard
            # (torch/distributed/fsdp/_flat_param.py FlatParamHandle._use_sharded_views); lora_A's pre-forward
            # (_runtime_utils._pre_forward, mixed precision) computes in param_dtype. NB measured, not derived: each
            # adapted module then saves its own new 16-bit copy of its input (no longer shared by q/k/v, gate/up),
            # and no fp32 copy is alive at any peak (meta trace = real 2-rank gloo ranks; with an fp32 copy alive
            # until the forward returns the recompute peak would be 127,104 B above them)
            xa = w.new(x.numel, mm_dt if ac else self.adapter_dt, x.rg)
        if self.dropout > 0:
            with w.frame():
                d = self._dropout(xa)
        else:
            d = xa
        if ac:
            copies = self.p.precision.adapter_copies
            with w.frame():  # lora_A
                a_in = self._autocast_cast(d, mm_dt)  # autocast's cast of the lora_A input (saved for lora_A's grad)
                w.save(a_in)
                # autocast casts fp32 LoRA weights to bf16 (cached); a linear saves W for dX when X needs grad
                a_copy = w.new(r * lin.in_features, ac, False) if copies else None
                if x.rg and a_copy is not None:
                    w.save(a_copy)
                a = w.new(T * r, ac)
                w.save(a)
            w.drop(*([a_copy] if a_copy is not None else []), *{d, a_in} - {x, xa})  # dropout's output released
            # (the fp32 cast of x, rebound to `x` inside peft's forward, lives until the forward returns)
            with w.frame():  # lora_B
                if copies:
                    b_copy = w.new(lin.out_features * r, ac, False)
                    w.save(b_copy)
                    w.copies += b_copy.nbytes + (a_copy.nbytes if x.rg else 0)
                b = w.new(n_out, mm_dt)
            w.drop(a)  # saved by lora_B; released from the layer's hands (matters only under offloading)
        else:
            with w.frame():  # lora_A
                a_in = w.cast(d, mm_dt)
                w.save(a_in)
                a = w.new(T * r, mm_dt)
                w.save(a)
            w.drop(*{d, a_in} - {x, xa})
            with w.frame():  # lora_B
                b = w.new(n_out, mm_dt)
            w.drop(a)
        bs = w.new(n_out, mm_dt)  # * scaling
        w.drop(b)
        if self.quantized:
            bc = w.cast(bs, res.dt) if conv else bs  # output = output.to(expected dtype): bs is released
            if bc is not bs:
                w.drop(bs)
            out = w.new(n_out, _promote(res.dt, bc.dt))
            w.drop(*{res, bs, bc, xa} - {out, x})
            return out
        # lora.Linear: result + output (promoted), then result.to(the base output's dtype)
        summed = w.new(n_out, _promote(res.dt, mm_dt))
        w.drop(bs)
        out = w.cast(summed, res.dt)
        w.drop(*{res, summed, xa} - {out, x})
        return out

    def _autocast_cast(self, t: Sym, dt: int) -> Sym:
        """autocast's cast of an fp32 input. torch caches the casts of fp32 leaves that require grad
        (autocast_mode.cpp `cached_cast`): the layer input is one in layer 0 with the input-grad hook
        and in a reentrant recompute (`layer_trace`), so where it feeds several LoRA layers as is
        (olmo2's q/k/v with lora_dropout 0) they share one copy."""
        if t.sid != self.leaf_sid or t.dt != 4 or t.dt == dt:
            return self.w.cast(t, dt)
        if dt not in self.cast_cache:
            self.cast_cache[dt] = self.w.cast(t, dt)
        return self.cast_cache[dt]

    def _dropout(self, x: Sym) -> Sym:
        w = self.w
        mask = w.new(x.numel, x.dt if self.cpu else 1, False)  # CPU: full-dtype noise; CUDA: bool
        out = w.new(x.numel, x.dt, x.rg)
        if x.rg:  # no backward through dropout when its input needs no grad (layer 0 without the hook)
            w.save(mask)
        w.drop(mask)
        return out

    def attention(self, x: Sym, cos_dt: int) -> Sym:
        with self.w.frame():  # the attention module
            return self._attention(x, cos_dt)

    def _attention(self, x: Sym, cos_dt: int) -> Sym:
        if self.m.mla is not None:
            return self._attention_mla(x, cos_dt)
        m, w, T = self.m, self.w, self.T
        lins = self.lins
        if "qkv_proj" in lins:
            qkv = self.linear(x, lins["qkv_proj"])
            q, k, v = w.view(qkv, T * m.q_dim), w.view(qkv, T * m.kv_dim), w.view(qkv, T * m.kv_dim)
        else:
            q = self.linear(x, lins["q_proj"])
            k = self.linear(x, lins["k_proj"])
            v = self.linear(x, lins["v_proj"])
        if m.layer_rope and self.nope:  # Llama 4's NoPE layers: attention temperature tuning on q only
            q = self._temperature_llama4(q)
        elif m.layer_rope:  # Llama 4: rotary as a complex product, then the weightless L2 qk norm
            q, k = self._rope_llama4(q, k)
        elif m.arch.qk_norm and m.arch.qk_norm_scope == "proj":  # olmo2: over the whole projections
            qn = self.norm(q, m.q_dim, T)
            kn = self.norm(k, m.kv_dim, T)
            w.drop(q, k)
            q, k = qn, kn
        elif m.arch.qk_norm:
            qn = self.norm(q, m.head_dim, T * m.num_heads)
            kn = self.norm(k, m.head_dim, T * m.num_kv_heads)
            w.drop(q, k)
            q, k = qn, kn
        # rotary: q * cos + rotate_half(q) * sin (cos/sin saved once at model level)
        liger_rope = "rope" in self.liger
        if m.layer_rope:
            qe, ke = q, k
        elif liger_rope:
            # Liger's RoPE (ops/rope.py `rope_forward`): q and k rotated in place by the Triton kernel
            # (their transposes back to [B, S, heads, d] are contiguous), ctx saves cos and sin only
            qe, ke = q, k
        elif m.arch.rotary_chunked:
            qe = self._rope_chunked(q, T * (m.q_dim // 2), cos_dt)
            ke = self._rope_chunked(k, T * (m.kv_dim // 2), cos_dt)
        else:
            qe = w.new(q.numel, _promote(q.dt, cos_dt), q.rg)
            ke = w.new(k.numel, _promote(k.dt, cos_dt), k.rg)
        if m.arch.rope_fp32:  # olmo2: fp32 cos/sin, then q_embed.to(q.dtype), k_embed.to(k.dtype)
            qc, kc = w.cast(qe, q.dt), w.cast(ke, k.dt)
            w.drop(*{qe, ke} - {qc, kc})
            qe, ke = qc, kc
        # nothing before the core needs grad (layer 0 without checkpointing, no LoRA on q/k/v): no saves
        self.attn_rg = q.rg or k.rg or v.rg
        if not liger_rope:
            w.drop(*[t for t in (q, k) if t.sid != v.sid])  # a fused qkv output lives on through v
        attn = self.p.attn_implementation
        if attn == "flash_attention_2":
            out = self._flash(qe, ke, v)
        elif attn == "eager":
            out = self._eager(qe, ke, v)
        else:
            # SDPA with enable_gqa (no mask, head_dim <= 256) runs on the KV heads; else (a padding mask,
            # or wide heads) transformers' repeat_kv copies K/V to the query heads
            padded = self.masked  # SDPA gets a mask: a padded batch, or a sliding window within the sequence
            if (m.head_dim > 256 or padded) and m.num_kv_heads != m.num_heads:
                kr, vr = w.new(T * m.q_dim, ke.dt), w.new(T * m.q_dim, v.dt)
                w.drop(ke, v)
                ke, v = kr, vr
            cdt = self.ac or max(qe.dt, ke.dt, v.dt)
            qc, kc, vc = (w.cast(t, cdt) for t in (qe, ke, v))
            saved = []
            if padded:
                # the [B, 1, S, S] bool mask becomes an additive float mask in the query's dtype, saved
                # for backward (CPU flash-for-cpu; CUDA mem-efficient, padded to a multiple of 16)
                saved.append(w.new(Lin(q=1), cdt, False))
            out = w.new(T * m.q_dim, qc.dt, self.attn_rg)
            # logsumexp [B, heads, S] fp32 (CUDA mem-efficient pads S to a multiple of 32: NB not rounded)
            lse = w.new(Lin(s=m.num_heads), 4, False)
            if self.attn_rg:
                w.save(qc, kc, vc, out, lse, *saved)
            w.drop(qc, kc, vc, lse, *saved)  # saved ones stay (but leave a step under offloading)
            w.drop(qe, ke, v)
        o = self.linear(out, lins["o_proj"])
        w.drop(out)
        return o

    def _attention_mla(self, x: Sym, cos_dt: int) -> Sym:
        """DeepSeek multi-head latent attention (DeepseekV3Attention / DeepseekV2Attention, 5.24), op
        by op: q through q_a_proj, q_a_layernorm, q_b_proj (or q_proj); kv_a_proj_with_mqa, split into
        the latent (kv_a_layernorm, which saves the projection's output itself when it is fp32: the
        norm's input is a view of it) and the shared rotary key; the rotary embedding on q_rot and
        k_rot (v3 interleaved: six half-width products then a cat; v2: complex products in fp32);
        q = cat(q_pass, q_rot); kv_b_proj on the normed latent, keys made by new_empty + two copy_
        (nothing saved), the values a view of kv_b's output.
        SDPA with v head dim != q/k head dim: the CPU math kernel (aten _scaled_dot_product_attention_math:
        q/k/v upcast to fp32, q · scale and k^T · scale saved, the causal mask built as a float
        [S, S], the scores, the softmax saved as [B, heads, S, S] fp32, the values made contiguous
        and saved by the second matmul); CUDA mem-efficient (output and logsumexp saved, as for other
        families). Then transpose(1, 2).contiguous() and o_proj.
        NB: the causal mask [S, S] is counted as B·S² (exact for batch 1)."""
        m, w, T = self.m, self.w, self.T
        a = m.mla
        lins, nh = self.lins, m.num_heads
        if "q_a_proj" in lins:
            qa = self.linear(x, lins["q_a_proj"])
            qn = self.norm(qa, a.q_lora_rank, T)
            w.drop(qa)
            q = self.linear(qn, lins["q_b_proj"])
            w.drop(qn)
        else:
            q = self.linear(x, lins["q_proj"])
        ckv = self.linear(x, lins["kv_a_proj_with_mqa"])
        kvn = self.norm(w.view(ckv, T * a.kv_lora_rank), a.kv_lora_rank, T)
        # rotary on q_rot [T, heads, rope] and k_rot [T, 1, rope]
        rot: list[Sym] = []
        for src, n in ((q, T * nh * a.qk_rope_head_dim), (ckv, T * a.qk_rope_head_dim)):
            dt = _promote(src.dt, cos_dt)
            if self.m.arch.rotary_complex:  # complex: xq.float() (a copy unless fp32), x * freqs, type_as
                f = w.new(n, 4, src.rg) if src.dt != 4 else None
                prod = w.new(n, 4, src.rg)
                if f is not None:
                    w.drop(f)
                out = w.cast(prod, src.dt)
                if out is not prod:
                    w.drop(prod)
            else:  # apply_rotary_pos_emb_interleave: (q1 cos - q2 sin, q2 cos + q1 sin), cat
                a1 = w.new(_half(n), dt, src.rg)
                b1 = w.new(_half(n), dt, src.rg)
                c1 = w.new(_half(n), dt, src.rg)
                w.drop(a1, b1)
                a2 = w.new(_half(n), dt, src.rg)
                b2 = w.new(_half(n), dt, src.rg)
                c2 = w.new(_half(n), dt, src.rg)
                w.drop(a2, b2)
                out = w.new(n, dt, src.rg)
                w.drop(c1, c2)
            rot.append(out)
        q_rot, k_rot = rot
        qs = w.new(T * m.q_dim, _promote(q.dt, q_rot.dt), q.rg or q_rot.rg)  # cat((q_pass, q_rot))
        w.drop(q, q_rot)
        kv = self.linear(kvn, lins["kv_b_proj"])
        w.drop(kvn)
        ks = w.new(T * m.q_dim, kv.dt, kv.rg or k_rot.rg)  # new_empty + copy_(k_nope) + copy_(k_rot)
        w.drop(k_rot)
        if not self.masked:
            w.drop(ckv)
        vs = w.view(kv, T * nh * a.v_head_dim)
        self.attn_rg = rg = qs.rg or ks.rg or vs.rg
        cdt = self.ac or max(qs.dt, ks.dt, vs.dt)
        qc, kc, vc = (w.cast(t, cdt) for t in (qs, ks, vs))
        if self.cpu:
            q32, k32, v32 = (w.cast(t, 4) for t in (qc, kc, vc))
            qq = w.new(q32.numel, 4, rg)  # query * sqrt(scale)
            kk = w.new(k32.numel, 4, rg)  # key^T * sqrt(scale)
            P = Lin(q=nh)
            mask = w.new(Lin(q=1), 1, False)  # ones(S, S).tril(), then as a float mask
            fm = w.new(Lin(q=1), 4, False)
            w.drop(mask)
            sc = w.new(P, 4, rg)
            w.drop(fm)
            probs = w.new(P, 4, rg)
            w.drop(sc)
            vv = w.new(v32.numel, 4, False) if v32 is vc and vc is vs else v32  # bmm's contiguous copy
            if rg:
                w.save(qq, kk)
            self.saved_at_probs = w.saved_bytes  # alive when the scores' matmul runs backward
            if rg:
                w.save(probs, vv)
            w.drop(*{q32, k32, v32} - {qc, kc, vc})
            o32 = w.new(T * nh * a.v_head_dim, 4, rg)
            oc = w.cast(o32, qc.dt)
            if oc is not o32:
                w.drop(o32)
            if qc.dt != 4:
                pw = w.new(P, qc.dt, False)  # attn.to(the input dtype), returned and dropped
                w.drop(pw)
            w.drop(qq, kk, probs, vv)
        else:
            # a padded batch: the bool mask as an additive float mask in the query's dtype, saved
            # (mem-efficient, padded to a multiple of 16: NB not rounded), as for the other families
            fmask = [w.new(Lin(q=1), cdt, False)] if self.masked else []
            oc = w.new(T * nh * a.v_head_dim, cdt, rg)
            lse = w.new(Lin(s=nh), 4, False)
            if rg:
                w.save(qc, kc, vc, oc, lse, *fmask)
            w.drop(lse, *fmask)  # saved ones stay (a checkpointed forward saves none: gone at once)
        w.drop(*{qc, kc, vc} - {qs, ks, vs})
        w.drop(qs, ks, kv)
        if self.masked:
            w.drop(ckv)
        if self.cpu:
            out = w.new(oc.numel, oc.dt, oc.rg)  # transpose(1, 2).contiguous() of the math kernel's output
            w.drop(oc)
        else:
            out = oc  # mem-efficient's output is laid out [B, S, heads, v]: the transpose is contiguous already
        o = self.linear(out, lins["o_proj"])
        w.drop(out)
        return o

    def _temperature_llama4(self, q: Sym) -> Sym:
        """Llama 4's NoPE layers with `attn_temperature_tuning`: (q * attn_scales).to(q.dtype), the fp32
        scales [1, S, 1, 1] (made from an arange, expanded over the batch) saved by the mul for q's
        gradient. NB the scales are counted as [T] (exact for batch 1)."""
        w = self.w
        if not self.m.attn_temperature_tuning:
            return q
        with w.frame():
            pos = w.new(self.T, 8, False)
            sc = w.new(self.T, 4, False)
            w.drop(pos)
        if q.rg:
            w.save(sc)
        prod = w.new(q.numel, _promote(q.dt, 4), q.rg)
        out = w.cast(prod, q.dt)
        w.drop(*{sc, prod, q} - {out})
        return out

    def _rope_llama4(self, q: Sym, k: Sym) -> tuple[Sym, Sym]:
        """Llama 4's RoPE layers (modeling_llama4.py apply_rotary_emb, Llama4TextL2Norm): x.float()
        viewed as complex, times freqs_cis (complex64, no grad: the mul saves only freqs_cis, a view of
        the model-level tensor), view_as_real, .type_as(x); then with `use_qk_norm` the L2 norm
        x.float() * rsqrt(mean(x²) + eps) (pow and mul save the fp32 input, rsqrt its output), .type_as.
        The caller drops q and k afterwards (they are the returned tensors where nothing changed).
        The NoPE layers (every 4th) run `_temperature_llama4` instead (`nope`)."""
        w, m = self.w, self.m
        out = []
        for t, heads in ((q, m.num_heads), (k, m.num_kv_heads)):
            f = w.cast(t, 4)
            c = w.new(t.numel, 4, t.rg)  # the complex64 product: numel / 2 elements of 8 B
            if f is not t:
                w.drop(f)
            o = w.cast(c, t.dt)
            if o is not c:
                w.drop(c)
            if m.l2_qk_norm:
                with w.frame():  # Llama4TextL2Norm
                    x32 = w.cast(o, 4)
                    w.mark(o.numel * 4)  # pow(2)
                    rs = w.new(self.T * heads, 4, o.rg)
                    if o.rg:
                        w.save(x32, rs)
                    h = w.new(o.numel, 4, o.rg)
                    n = w.cast(h, o.dt)
                    w.drop(*{x32, rs, h} - {n})
                w.drop(o)
                o = n
            if o is not t:
                w.drop(t)
            out.append(o)
        return out[0], out[1]

    def _rope_chunked(self, x: Sym, half: Lin, cos_dt: int) -> Sym:
        """gpt_oss `_apply_rotary_emb`: x1, x2 = chunk(x, 2); cat(x1·cos - x2·sin, x2·cos + x1·sin).
        The muls save only cos/sin (the model's, saved once); every product is a temporary."""
        w, dt = self.w, _promote(x.dt, cos_dt)
        a, b = w.new(half, dt, x.rg), w.new(half, dt, x.rg)
        first = w.new(half, dt, x.rg)
        w.drop(a, b)
        a, b = w.new(half, dt, x.rg), w.new(half, dt, x.rg)
        second = w.new(half, dt, x.rg)
        w.drop(a, b)
        out = w.new(half * 2, dt, x.rg)
        w.drop(first, second)
        return out

    def _flash(self, q: Sym, k: Sym, v: Sym) -> Sym:
        """FlashAttention-2 (transformers 5.24 integrations/flash_attention.py and
        modeling_flash_attention_utils._flash_attention_forward; flash-attn 2.x flash_attn_interface.py
        and csrc/flash_attn/flash_api.cpp), from the rotary outputs [B, H, S, D] on: transposed views;
        fp32 q/k/v cast to the autocast dtype (else the load dtype) only when q is fp32
        (fa_peft_integration_check); no repeat_kv (GQA in the kernel); head_dim padded to a multiple of 8
        (F.pad copies). The projections are made as [B, S, H, D] and transposed, and the rotary
        product keeps that layout (elementwise ops follow their first input's strides; the cast too),
        so transposing back gives contiguous q/k/v: the varlen path's `.contiguous()` copies nothing,
        `out = empty_like(q)` is contiguous, and the model's `reshape(B, S, -1).contiguous()` is a view
        (a copy only when head_dim was padded: `out[..., :D]`). Varlen (a packed row of one:
        `_prepare_from_posids`) saves the cu_seqlens too. Saved: q, k, v, out, softmax_lse fp32
        [B, H, S] ([H, total] varlen), rng_state (int64 [2]); FA2 is CUDA-only, so the small ones
        count 512 B each. Checked against simulate's emulation (memplan/simulate/flash.py), whose
        strides are torch's own."""
        m, w, T = self.m, self.w, self.T
        if q.dt == 4:  # the cast happens only for an fp32 query
            cdt = self.ac or self.p.precision.load
            qc, kc, vc = (w.cast(t, cdt) for t in (q, k, v))
        else:
            qc, kc, vc = q, k, v
        hd8 = -(-m.head_dim // 8) * 8
        parts = (qc, kc, vc)
        nograd = []  # made inside FlashAttnFunc.forward, where grad mode is off
        if hd8 != m.head_dim:  # F.pad to a multiple of 8
            heads = (m.num_heads, m.num_kv_heads, m.num_kv_heads)
            parts = tuple(w.new(T * (h * hd8), t.dt, t.rg) for t, h in zip(parts, heads))
            nograd += parts
        fq, fk, fv = parts
        self.flash_dt = fq.dt
        out = w.new(T * (m.num_heads * hd8), fq.dt, self.attn_rg)
        lse = w.new(Lin(s=m.num_heads), 4, False)
        rng = w.new(512, 1, False)
        small = [rng] + ([w.new(512, 1, False)] if self.varlen else [])  # rng_state, cu_seqlens (transformers')
        w.nograd.update(t.sid for t in (*nograd, out, lse, rng))
        if self.attn_rg:
            w.save(fq, fk, fv, out, lse, *small)
            self.saved_at_probs = w.saved_bytes  # alive while the kernel runs backward
        else:
            w.drop(fq, fk, fv, lse, *small)
        w.drop(qc, kc, vc, q, k, v)  # saved ones stay
        if hd8 == m.head_dim:
            return out  # contiguous: the reshape is a view
        ot = w.new(T * m.q_dim, out.dt, out.rg)  # out[..., :D].reshape(B, S, -1).contiguous(): a copy
        w.drop(out)
        return ot

    def _eager(self, q: Sym, k: Sym, v: Sym) -> Sym:
        """Eager attention (transformers' eager_attention_forward), op by op: q @ k^T, soft-capping,
        the mask added, an fp32 softmax (saved), its cast (saved with v by the second matmul); no
        attention dropout. Checked against real CPU steps and simulate (tests/test_agreement_*)."""
        m, w = self.m, self.w
        if m.num_kv_heads != m.num_heads:  # repeat_kv materialises K/V at full head count
            kr, vr = w.new(self.T * m.q_dim, k.dt), w.new(self.T * m.q_dim, v.dt)
            w.drop(k, v)
            k, v = kr, vr
        cdt = self.ac or q.dt
        qc, kc, vc = (w.cast(t, cdt) for t in (q, k, v))
        probs = Lin(q=m.num_heads)  # [B, heads, S, S]
        w.save(qc, kc)
        scores = w.new(probs, cdt)
        if m.attn_logit_softcapping:
            s2 = w.new(probs, cdt)  # scores / cap -> tanh (saved) -> * cap
            w.save(s2)
            w.drop(scores)
            scores = w.new(probs, cdt)
        masked = w.new(probs, cdt)
        w.drop(scores)
        if m.arch.attention_sinks:
            return self._eager_sinks(qc, kc, vc, q, k, v, masked)
        sm = w.new(probs, 4)
        w.save(sm)
        self.saved_at_probs = w.saved_bytes  # alive, with the probabilities, in their softmax's backward
        w.drop(masked)
        pc = w.cast(sm, qc.dt)
        w.save(pc, vc)
        out = w.new(self.T * m.q_dim, qc.dt)
        ot = w.new(out.numel, out.dt)  # transpose(1, 2).contiguous()
        w.drop(q, k, v, out)
        return ot

    def _eager_sinks(self, qc: Sym, kc: Sym, vc: Sym, q: Sym, k: Sym, v: Sym, masked: Sym) -> Sym:
        """gpt_oss eager_attention_forward from the masked logits on: cat([logits, sinks]) -> [B, heads,
        S, S+1] in the promoted dtype (the sinks are fp32 after prepare), minus its max over the last
        dim (max saves its int64 indices [B, heads, S, 1]), softmax in that dtype (its output saved),
        the sink column dropped (a view) and `.to(value dtype)` (a copy: the slice is not dense), which
        the second matmul saves (autocast's cast of it where the dtypes differ). `attn_weights` (the
        masked logits) and `combined_logits` stay referenced until the function returns."""
        m, w = self.m, self.w
        probs, rows = Lin(q=m.num_heads), Lin(s=m.num_heads)
        sdt = _promote(masked.dt, self.weights_dt)
        comb = w.new(probs + rows, sdt)
        mv, mi = w.new(rows, sdt), w.new(rows, 8, False)
        w.save(mi)
        c2 = w.new(probs + rows, sdt)
        w.drop(comb, mv)
        sm = w.new(probs + rows, sdt)
        w.save(sm)
        self.probs_dt = sdt  # the softmax runs in the logits' dtype (bf16 without prepare), not fp32
        self.saved_at_probs = w.saved_bytes
        pv = w.new(probs, vc.dt) if vc.dt != sdt else w.view(sm, probs)
        w.drop(masked)
        pc = w.cast(pv, self.ac or pv.dt)
        if pc is not pv:
            w.drop(pv)
        w.save(pc, vc)
        out = w.new(self.T * m.q_dim, pc.dt)
        ot = w.new(out.numel, out.dt)  # transpose(1, 2).contiguous()
        w.drop(q, k, v, out, c2)
        return ot

    def mlp(self, x: Sym) -> Sym:
        with self.w.frame():  # the MLP module
            return self._mlp(x)

    def _mlp(self, x: Sym) -> Sym:
        if self.m.is_moe and self.m.arch.moe.router_kind == "sigmoid_input_scale":
            return self._moe_llama4(x)
        if self.m.is_moe and self.m.arch.moe.activation == "clamped_swiglu":
            return self._moe_gpt_oss(x)
        if self.m.is_moe:
            return self._moe(x)
        return self._mlp_dense(x, self.m.intermediate_size)

    def _mlp_dense(self, x: Sym, I: int) -> Sym:
        w, T = self.w, self.T
        lins = self.lins
        if "swiglu" in self.liger:
            # Liger's SwiGLU MLP (transformers/swiglu.py LigerSwiGLUMLP.forward, ops/swiglu.py
            # `LigerSiLUMulFunction`): down(silu_mul(gate(x), up(x))); c = empty_like(a) (a's dtype), ctx
            # saves a and b; the backward writes da and db into them in place
            gu = None
            if "gate_up_proj" in lins:
                # phi3 (LigerPhi3SwiGLUMLP): gate_up_proj(x).chunk(2): the Function's ensure_contiguous
                # copies both halves (grad mode off), which it saves; the fused output lives on as their base
                gu = self.linear(x, lins["gate_up_proj"])
                g, u = w.new(T * I, gu.dt), w.new(T * I, gu.dt)
                w.nograd.update((g.sid, u.sid))
            else:
                g = self.linear(x, lins["gate_proj"])
                u = self.linear(x, lins["up_proj"])
            prod = w.new(g.numel, g.dt)
            w.nograd.add(prod.sid)
            w.save(g, u)
            self.saved_before_down = w.saved_bytes
            out = self.linear(prod, lins["down_proj"])
            self.prod_dt, self.down_out_dt = prod.dt, out.dt
            w.drop(prod, *([gu] if gu is not None else []))
            return out
        # down(act(gate(x)) * up(x)): act runs before up (Python evaluates left to right)
        if "gate_up_proj" in lins:
            gu = self.linear(x, lins["gate_up_proj"])
            g, u = w.view(gu, T * I), w.view(gu, T * I)
            with w.frame():  # act_fn
                act = w.new(g.numel, g.dt)
        else:
            g = self.linear(x, lins["gate_proj"])
            with w.frame():  # act_fn
                act = w.new(g.numel, g.dt)
            w.save(g)  # silu / gelu(tanh) backward needs the input
            w.drop(g)  # (a saved tensor stays; under offloading it leaves the device here)
            u = self.linear(x, lins["up_proj"])
        w.save(g)  # silu / gelu(tanh) backward needs the input
        prod = w.new(g.numel, _promote(act.dt, u.dt))
        w.save(act, u)
        w.drop(act, u)
        self.saved_before_down = w.saved_bytes
        out = self.linear(prod, lins["down_proj"])
        self.prod_dt, self.down_out_dt = prod.dt, out.dt
        w.drop(prod)
        return out

    def _moe(self, x: Sym) -> Sym:
        """A sparse MoE block (MixtralSparseMoeBlock, transformers 5.24): the router, then the fused
        experts through `grouped_mm_experts_forward` (integrations/moe.py), each wrapped by peft's
        `lora.ParamWrapper` where adapted (tuners/lora/layer.py). Op by op on a real CPU step:

        - router (a ParamWrapper on its [E, H] weight when adapted): the delta B @ A (under autocast on
          the cached 16-bit copies of A and B, saved by the mm), * scaling, .to(the weight's dtype);
          `register_parametrization` evaluates W + delta once (a check), then the cached W + delta
          serves F.linear (autocast casts it and x, both saved); logits.float(), softmax (saved),
          topk (indices saved), the in-place renormalisation (saves the sum and a clone of the values);
        - experts (ParamWrappers nested: down_proj outside, gate_up_proj inside): the down check
          evaluates W + scaling · lhs @ rhs (one `baddbmm`, [E, H, I]) and drops it; the gate_up
          evaluation, made under `parametrize.cached()`, is the merged weight the step uses (saved by
          grouped_mm for the input gradient); sort of the T·k expert ids (values and permutation),
          perm // k (saved), the gathered states [T·k, H] (saved), the sorted routing weights (saved),
          histc's float copy of the ids and its counts, the offsets (saved); grouped_mm -> [T·k, 2I]
          (saved by silu and mul), silu (saved), the product (saved by the next grouped_mm), the down
          merged weight (saved), grouped_mm -> [T·k, H] (saved by the routing-weight mul), the
          weighted rows, the inverse permutation (saved) and its arange, the unpermuted rows, and
          their sum over k -> [T, H].
        NB: MoE blocks without shared experts, routers without bias (Mixtral's layout).
        """
        m, w, T, H = self.m, self.w, self.T, self.m.hidden_size
        E, k, I = m.num_experts, m.experts_per_token, m.expert_intermediate_size
        S = T * k
        pdt, ac = self.weights_dt, self.ac
        targets = self.expert_targets
        full = self.full
        moe = m.arch.moe
        shared = None
        if m.shared_expert_intermediate_size and not moe.shared_experts_key:  # Qwen2-MoE: the shared expert first
            with w.frame():
                shared = self._mlp_dense(x, m.shared_expert_intermediate_size)
        # -- the router ------------------------------------------------------------------------------
        with w.frame():  # the router's ParamWrapper (or the router alone)
            lora = "router" in targets
            rg = x.rg or lora or full
            wm = None
            if lora:
                mm_dt = ac or self.adapter_dt
                if ac and self.p.precision.adapter_copies:
                    ca, cb = w.new(self.r * H, ac), w.new(E * self.r, ac)
                    w.save(ca, cb)
                    w.copies += ca.nbytes + cb.nbytes
                d0 = w.new(E * H, mm_dt)
                d1 = w.new(E * H, mm_dt)
                w.drop(d0)
                delta = w.cast(d1, pdt)
                if delta is not d1:
                    w.drop(d1)
                with w.frame():  # register_parametrization's check: W + delta, dropped
                    chk = w.new(E * H, pdt)
                w.drop(chk)
            with w.frame():  # the router module
                if lora:
                    with w.frame():  # the parametrization (cached for the ParamWrapper's forward)
                        wm = w.new(E * H, pdt)
                if ac:  # autocast casts x and the (merged) weight; F.linear saves each for the other's grad
                    wc = w.new(E * H, ac, False)
                    xr = w.cast(x, ac)
                    if lora or full:
                        w.save(xr)
                    if x.rg:
                        w.save(wc)
                    logits = w.new(T * E, ac, rg)
                    w.drop(*{xr, wc} - {x})
                elif moe.router_fp32:  # F.linear(hidden.type(float32), weight.type(float32))
                    xf = w.cast(x, 4)
                    if lora or full:
                        w.save(xf)
                    if x.rg and wm is not None:
                        w.save(wm)
                    logits = w.new(T * E, 4, rg)
                    if xf is not x:
                        w.drop(xf)
                else:
                    if lora or full:
                        w.save(x)
                    if x.rg and wm is not None:
                        w.save(wm)
                    logits = w.new(T * E, _promote(x.dt, pdt), rg)
                if moe.router_kind != "softmax_topk":
                    vals = self._group_router(logits, rg)
                else:
                    lf = w.cast(logits, 4)  # router_logits is returned (the block keeps it as `_`)
                    probs = w.new(T * E, 4, rg)
                    if lf is not logits:
                        w.drop(lf)
                    vals, idx = w.new(T * k, 4, rg), w.new(T * k, 8, False)
                    if rg:
                        w.save(probs, idx)
                    w.drop(probs)
                    if m.norm_topk_prob:
                        ssum = w.new(T, 4, rg)
                        if rg:
                            clone = w.new(T * k, 4, False)
                            w.save(ssum, clone)  # div_ saves the sum and a clone of the values
                            w.drop(clone)  # only autograd keeps it
                        w.drop(ssum)
                    if moe.scores_cast:  # Qwen: router_top_value.to(router_logits.dtype)
                        sc = w.cast(vals, logits.dt)
                        if sc is not vals:
                            w.drop(vals)
                            vals = sc
            w.drop(*[t for t in (wm, *( [delta] if lora else [])) if t is not None])
        # -- the experts -----------------------------------------------------------------------------
        # grouped_mm saves its input for the weight's gradient: where peft adapts that weight (or trains it)
        gu_rg, dn_rg = "gate_up" in targets or full, "down" in targets or full
        r2 = 2 * self.r  # the conversion doubles gate_up's rank
        down_factors: tuple[Sym, ...] = ()
        with w.frame():  # the outer ParamWrapper (down_proj)
            if "down" in targets:
                # get_delta_factors: lhs/rhs .to(the weight's dtype) -- copies when the adapters differ
                # (saved by baddbmm: each needs the other for its gradient)
                if self.adapter_dt != pdt:
                    down_factors = (w.new(E * H * self.r, pdt), w.new(E * self.r * I, pdt))
                    w.save(*down_factors)
                with w.frame():  # register_parametrization's check, outside `cached()`: dropped
                    chk = w.new(E * H * I, pdt)
                w.drop(chk)
            with w.frame():  # the inner ParamWrapper (gate_up_proj)
                mgu = None
                if "gate_up" in targets:
                    if self.adapter_dt != pdt:
                        w.save(w.new(E * 2 * I * r2, pdt), w.new(E * r2 * H, pdt))
                    with w.frame():  # its check runs under the outer `cached()`: the merged weight used
                        mgu = w.new(E * 2 * I * H, pdt)
                with w.frame():  # the experts module: every local lives until it returns
                    # autograd saves what a gradient needs: index its indices, grouped_mm its input for
                    # the weight's gradient and the weight for the input's, silu / mul their inputs
                    sv, perm = w.new(S, 8, False), w.new(S, 8, False)
                    pk = w.new(S, 8, False)
                    xg = w.new(S * H, x.dt, x.rg)
                    sw = w.new(S, vals.dt, rg)
                    if x.rg:
                        w.save(pk)
                    if rg:
                        w.save(perm)
                    w.drop(pk)  # `perm // num_top_k`, the index's argument: only autograd keeps it
                    hin = w.new(S, 4, False)  # histc's input: the ids as float on CPU, int32 on CUDA
                    hist = w.new(E, 4, False)
                    offs = w.new(E, 4, False)
                    xin = w.cast(xg, pdt)
                    if mgu is not None and x.rg:
                        w.save(mgu)
                    if gu_rg:
                        w.save(xin)
                    g_rg = x.rg or gu_rg
                    if g_rg:
                        w.save(offs)
                    gu = w.new(S * 2 * I, pdt, g_rg)
                    with w.frame():  # act_fn
                        act = w.new(S * I, pdt, g_rg)
                    prod = w.new(S * I, pdt, g_rg)
                    if g_rg:
                        w.save(gu, act)
                    w.drop(gu, act)  # proj_out is rebound to the product (act is _apply_gate's local)
                    if dn_rg:
                        w.save(prod)
                    md = None
                    if "down" in targets:
                        with w.frame():  # evaluated under `cached()`
                            md = w.new(E * H * I, pdt)
                        if g_rg:
                            w.save(md)
                    d_rg = g_rg or dn_rg
                    if d_rg:
                        w.save(offs)
                    dn = w.new(S * H, pdt, d_rg)
                    w.drop(prod)  # proj_out rebound to the down projection's output
                    if d_rg:
                        w.save(sw)
                    if rg:
                        w.save(dn)
                    wo = w.new(S * H, _promote(pdt, sw.dt), d_rg or rg)
                    inv, ar = w.new(S, 8, False), w.new(S, 8, False)
                    w.drop(ar)
                    if wo.rg:
                        w.save(inv)
                    wo2 = w.new(S * H, wo.dt, wo.rg)
                    w.drop(wo)
                    fin = w.new(T * H, wo.dt, wo.rg)
                    w.drop(wo2, sv, perm, pk, xg, xin, sw, hin, hist, offs, gu, act, prod, dn, inv,
                           *([md] if md is not None else []))
                    sw_dt = sw.dt
                out = w.cast(fin, x.dt)  # final_hidden_states.to(hidden_states.dtype), as it returns
                if out is not fin:
                    w.drop(fin)
        w.drop(logits, vals)  # the router's outputs, locals of the block
        experts_saved = w.saved_bytes
        if moe.shared_experts_key and m.shared_expert_intermediate_size:
            # DeepseekV3MoE: hidden_states + self.shared_experts(residuals), no gate
            with w.frame():
                sh = self._mlp_dense(x, m.shared_expert_intermediate_size)
            tot = w.new(out.numel, _promote(out.dt, sh.dt), True)
            w.drop(out, sh)
            out = tot
        if shared is not None:
            # sigmoid(shared_expert_gate(x)) * shared_output; expert_output + that
            g = self.linear(x, self.lins["shared_expert_gate"])
            sg = w.new(g.numel, g.dt, g.rg)
            w.drop(g)
            if g.rg:
                w.save(sg)  # sigmoid saves its output
            gs = w.new(shared.numel, _promote(sg.dt, shared.dt), sg.rg or shared.rg)
            if shared.rg:
                w.save(sg)
            if sg.rg:
                w.save(shared)
            w.drop(sg, shared)
            tot = w.new(out.numel, _promote(out.dt, gs.dt), True)
            w.drop(out, gs)
            out = tot
        # what the experts' backward frees before its largest moments (estimate's moe moments)
        saved = lambda *ts: sum((t.nbytes for t in ts if t is not None and t.sid in w.saved), Lin())  # noqa: E731
        self.moe_late = saved(dn, sw, inv)
        # saved after the experts (the shared expert's gated branch): freed before the experts' backward
        self.moe_tail = w.saved_bytes - experts_saved
        self.moe_sw_dt = sw_dt
        self.moe_mid = saved(prod, md, *down_factors)  # the down grouped_mm's and baddbmm's saved tensors
        self.moe_act = saved(act, gu)  # the activation's (silu and mul)
        self.moe_dt = pdt
        self.saved_before_down = w.saved_bytes
        return out

    def _group_router(self, logits: Sym, rg: bool) -> Sym:
        """DeepSeek's routers after the logits, op by op; returns the routing weights [T, k].

        sigmoid_group_topk (DeepseekV3TopkRouter): sigmoid (its output saved), + the fp32
        e_score_correction_bias, the group scores (top-2 per group, summed), the top `topk_group`
        groups, a zeros_like + scatter_ mask expanded to [T, E] (a copy), masked_fill with its inverted
        bool mask (saved), top-k (indices saved), gather of the sigmoid scores (the same indices),
        the renormalisation by `norm_topk_prob` (the sum + 1e-20 and a clone of the values saved by
        div_), × routed_scaling_factor. softmax_group_topk (DeepseekV2TopkRouter): softmax in fp32
        (saved), `topk_method` greedy (top-k of it) or group_limited_greedy (the group max, the same
        mask, masked_fill with 0), × routed_scaling_factor.
        """
        m, w, T = self.m, self.w, self.T
        E, k = m.num_experts, m.experts_per_token
        cfg = m.config
        G = int(cfg.get("n_group") or 1)
        sig = m.arch.moe.router_kind == "sigmoid_group_topk"
        grouped = sig or cfg.get("topk_method") == "group_limited_greedy"
        sc = w.new(T * E, logits.dt if sig else 4, rg)  # sigmoid / softmax(dtype=float32): output saved
        if rg:
            w.save(sc)
        tmp: list[Sym] = []
        choice = w.new(T * E, _promote(sc.dt, 4), rg) if sig else sc  # + e_score_correction_bias
        if grouped:
            gv = w.new(T * G * (2 if sig else 1), choice.dt, False)
            gi = w.new(T * G * (2 if sig else 1), 8, False)
            gs = w.new(T * G, choice.dt, False) if sig else gv
            w.drop(*{gv, gi} - {gs})
            ti, tv = w.new(T * int(cfg.get("topk_group") or 1), 8, False), None
            gm = w.new(T * G, gs.dt, False)  # zeros_like + scatter_
            w.drop(gs, ti)
            sm = w.new(T * E, gm.dt, False)  # expand(...).reshape: a copy
            w.drop(gm)
            b = w.new(T * E, 1, False)       # .bool()
            nb = w.new(T * E, 1, False)      # ~
            w.drop(sm, b)
            masked = w.new(T * E, choice.dt, rg)
            # masked_fill saves its mask; in v3 only the top-k indices of the result are used (its values
            # are discarded with the graph behind them), so that mask is freed at once
            if rg and not sig:
                w.save(nb)
            w.drop(nb)
            tmp += [masked]
            del tv
        else:
            masked = choice
        vals, idx = w.new(T * k, masked.dt, rg), w.new(T * k, 8, False)
        if rg:
            w.save(idx)
        if sig:
            w.drop(vals)
            vals = w.new(T * k, sc.dt, rg)  # scores.gather(1, topk_indices)
        w.drop(*tmp, *([choice] if choice is not sc else []))
        if sig and m.norm_topk_prob:
            ssum = w.new(T, vals.dt, rg)
            den = w.new(T, vals.dt, rg)
            w.drop(ssum)
            if rg:
                clone = w.new(T * k, vals.dt, False)
                w.save(den, clone)  # div_ saves the sum and a clone of the values
                w.drop(clone)  # only autograd keeps it
            w.drop(den)
        out = w.new(T * k, vals.dt, rg)  # * routed_scaling_factor
        w.drop(vals, sc)
        return out

    def _moe_llama4(self, x: Sym) -> Sym:
        """Llama4TextMoe (modeling_llama4.py), op by op as a real CPU step runs it:

        - the router (Llama4Router: an nn.Linear subclass, frozen, never LoRA-wrapped here, see
          estimate._llama4_checks): F.linear under autocast (the weight's 16-bit copy saved for the
          input's gradient), topk (values, int64 indices saved), full_like(-inf).scatter_, .float(),
          sigmoid (its output saved), .to(the logits' dtype): the scores [T, E];
        - routed_in = x.repeat(E, 1) [E·T, H] (saved by the mul for the scores' gradient), the scores
          transposed and reshaped to [E·T, 1] (a copy, saved for routed_in's gradient), their product;
        - Llama4TextExperts: bmm(x [E, T, H], gate_up_proj [E, H, 2I]) (under autocast: both cast,
          the weight's copy saved for the input's gradient), chunk, act_fn(gate) (saves gate, i.e. the
          whole gate_up output), up * act (saves both), bmm with down_proj [E, I, H] (its copy saved);
        - the shared expert (a Llama MLP of 4-bit Linears) on x; out.add_(routed.view(E, T, H).sum(0)).
        Every expert runs on all T tokens: no routing dependence. Saved per block (measured,
        tests/test_simulate_llama4.py): 2EH + 8Tk + 6TE + 4ETH + 6ETI + 6EHI + the shared expert's.
        """
        m, w, T, H = self.m, self.w, self.T, self.m.hidden_size
        E, k, I = m.num_experts, m.experts_per_token, m.expert_intermediate_size
        pdt, ac, full = self.weights_dt, self.ac, self.full
        rg = x.rg or full
        with w.frame():  # Llama4Router
            if ac:
                wc = w.new(E * H, ac, False) if pdt != ac else None
                xr = w.cast(x, ac)
                if full:
                    w.save(xr)
                if x.rg and wc is not None:
                    w.save(wc)
                logits = w.new(T * E, ac, rg)
                w.drop(*{xr, *([wc] if wc is not None else [])} - {x})
            else:
                if full:
                    w.save(x)
                logits = w.new(T * E, _promote(x.dt, pdt), rg)
            vals, idx = w.new(T * k, logits.dt, rg), w.new(T * k, 8, False)
            if rg:
                w.save(idx)
            filled = w.new(T * E, logits.dt, rg)  # full_like(-inf), scatter_ in place
            w.drop(vals)
            f32 = w.cast(filled, 4)
            sg = w.new(T * E, 4, rg)
            if rg:
                w.save(sg)
            scores = w.cast(sg, logits.dt)
            w.drop(*{filled, f32, sg} - {scores})
        rep = w.new(T * E * H, x.dt, x.rg)  # x.repeat(E, 1)
        col = w.new(T * E, scores.dt, scores.rg)  # scores.transpose(0, 1).reshape(-1, 1): a copy
        if scores.rg:
            w.save(rep)
        if x.rg:
            w.save(col)
        routed = w.new(T * E * H, _promote(x.dt, scores.dt), x.rg or scores.rg)
        w.drop(rep, col)
        with w.frame():  # Llama4TextExperts
            g_rg = routed.rg or full
            if ac:
                xc = w.cast(routed, ac)
                gw = w.new(E * H * 2 * I, ac, False) if pdt != ac else None
                if full:
                    w.save(xc)
                if routed.rg and gw is not None:
                    w.save(gw)
                gu = w.new(T * E * 2 * I, ac, g_rg)
                if xc is not routed:
                    w.drop(xc)  # autocast's cast of the input: a temporary of the bmm (saved only when trained)
            else:
                xc, gw = routed, None
                if full:
                    w.save(routed)
                gu = w.new(T * E * 2 * I, _promote(routed.dt, pdt), g_rg)
            with w.frame():  # act_fn
                act = w.new(T * E * I, gu.dt, g_rg)
            if g_rg:
                w.save(gu, act)
            prod = w.new(T * E * I, gu.dt, g_rg)
            if full:
                w.save(prod)
            dw = None
            if ac and pdt != ac:
                dw = w.new(E * I * H, ac, False)
                if g_rg:
                    w.save(dw)
            eo = w.new(T * E * H, prod.dt, g_rg)
            w.drop(*{xc, *([gw] if gw is not None else []), gu, act, prod, *([dw] if dw is not None else [])}
                   - {routed})
        routed_saved = w.saved_bytes
        with w.frame():  # the shared expert
            out = self._mlp_dense(x, m.shared_expert_intermediate_size)
        ssum = w.new(T * H, eo.dt, eo.rg)  # routed_out.view(E, T, H).sum(0); out.add_(it) in place
        w.drop(eo, ssum, logits, scores, routed)  # the block's locals, alive until it returns
        # for estimate's Llama 4 moments: the shared expert's saved set (its backward runs first), the
        # gate_up weight copy, the down weight copy, the activation's saved tensors (freed in that order)
        saved = lambda *ts: sum((t.nbytes for t in ts if t is not None and t.sid in w.saved), Lin())  # noqa: E731
        self.moe_tail = w.saved_bytes - routed_saved
        self.moe_late, self.moe_mid, self.moe_act = saved(gw), saved(dw), saved(gu, act)
        self.moe_dt, self.moe_sw_dt = eo.dt, scores.dt
        # the locals still referenced when a checkpointed recompute stops at its last save (inside the
        # shared expert's down projection): the layer's residual and normed input, the router's scores
        # and logits, the scaled input, the experts' output, the shared expert's product (measured);
        # the layer input is counted by the caller where it is not saved
        li = self.layer_in
        self.moe_stale = w.unsaved_at_last_save - (li.nbytes if li.sid in w.live and li.sid not in w.saved else 0)
        self.moe_stale_shared = Lin()
        down = self.lins["down_proj"]
        if self.targeted(down) and self.quantized and self.p.quant != "int8":
            # NB measured on CPU (real steps, simulate; CUDA: simulate): the shared down_proj's 4-bit base
            # output (compute dtype) stays referenced with the stopped recompute's frames, its defensive clone not
            # (without dropout the stop comes after it is released); with dropout the stop comes inside
            # lora_A: the clone and the dropout output referenced, lora_B's 16-bit weight copy not made --
            # those released by the down projection's backward
            clone = self.last_clone.nbytes
            self.moe_stale = self.moe_stale + T * H * self.cd - clone
            if self.dropout > 0 and self.cpu:  # NB CUDA: checked against simulate where it is not the peak
                b_copy = down.out_features * self.r * self.ac if self.ac and self.p.precision.adapter_copies else 0
                self.moe_stale_shared = T * m.shared_expert_intermediate_size * self.adapter_dt + clone - b_copy
            self.moe_stale = self.moe_stale + self.moe_stale_shared
        return out

    def _moe_gpt_oss(self, x: Sym) -> Sym:
        """gpt_oss's MoE block (GptOssMLP, transformers 5.24), experts frozen (peft wraps none):

        - GptOssTopKRouter: F.linear(x, weight [E, H], bias [E]) (under autocast: the bias, the weight
          and x cast, the weight's copy saved for dX), topk over the logits (indices saved), softmax
          over the k values in their own dtype (output saved); the logits stay referenced (`_`) until
          the block returns;
        - GptOssExperts through `grouped_mm_experts_forward` (integrations/moe.py, is_transposed,
          has_bias): sort of the T·k ids (values, permutation -- saved), perm // k (saved), the gathered
          states [T·k, H], the sorted routing weights, histc's float ids, counts, offsets (saved);
          `gate_up_proj_bias[expert_ids_g]` [T·k, 2I] gathered before the grouped_mm and added in
          place to its output [T·k, 2I]; `_apply_gate`: gate/up strided views, clamp (both save their
          input, the grouped_mm output), gate·alpha, sigmoid (saved), gate·σ (saves the clamped gate),
          up + 1 (saved), (up + 1)·glu; the down bias gathered [T·k, H] (the gate_up one released),
          grouped_mm -> [T·k, H] (saved by the routing-weight mul, which also saves the weights), the
          weighted rows, the inverse permutation (saved) and its arange, the unpermuted rows, their
          sum over k and its cast to the input dtype. Measured against real CPU steps
          (tests/test_agreement_cpu.py).
        """
        m, w, T, H = self.m, self.w, self.T, self.m.hidden_size
        E, k, I = m.num_experts, m.experts_per_token, m.expert_intermediate_size
        S = T * k
        pdt, ac, rg = self.weights_dt, self.ac, x.rg
        with w.frame():  # the router module
            if ac:  # autocast casts the bias, the weight (saved for dX) and x, where not already 16-bit
                bc = w.new(E, ac, False) if pdt != ac else None
                wc = w.new(E * H, ac, False) if pdt != ac else None
                xr = w.cast(x, ac)
                if rg and wc is not None:
                    w.save(wc)
                logits = w.new(T * E, ac, rg)
                w.drop(*{t for t in (bc, xr, wc) if t is not None} - {x})
            else:
                logits = w.new(T * E, _promote(x.dt, pdt), rg)
            vals, idx = w.new(T * k, logits.dt, rg), w.new(T * k, 8, False)
            sc = w.new(T * k, logits.dt, rg)
            if rg:
                w.save(idx, sc)
            w.drop(vals)
        with w.frame():  # the experts module: every local lives until it returns
            sv, perm = w.new(S, 8, False), w.new(S, 8, False)
            pk = w.new(S, 8, False)
            xg = w.new(S * H, x.dt, rg)
            sw = w.new(S, sc.dt, rg)
            if rg:
                w.save(pk, perm)
            hin = w.new(S, 4, False)  # histc's input: the ids as float on CPU, int32 on CUDA
            hist, offs = w.new(E, 4, False), w.new(E, 4, False)
            bg = w.new(S * 2 * I, pdt, False)  # gate_up_proj_bias[expert_ids_g]
            xin = w.cast(xg, pdt)
            if rg:
                w.save(offs)
            gu = w.new(S * 2 * I, pdt, rg)  # + bias, in place
            g2, u2 = w.new(S * I, pdt, rg), w.new(S * I, pdt, rg)  # the clamps
            ga = w.new(S * I, pdt, rg)
            sg = w.new(S * I, pdt, rg)
            w.drop(ga)
            glu = w.new(S * I, pdt, rg)
            u3 = w.new(S * I, pdt, rg)
            prod = w.new(S * I, pdt, rg)
            if rg:
                w.save(gu, g2, sg, glu, u3)
            w.drop(u2)
            bd = w.new(S * H, pdt, False)  # down_proj_bias[expert_ids_g]
            w.drop(bg)
            dn = w.new(S * H, pdt, rg)
            w.drop(prod)
            if rg:
                w.save(sw, dn)
            wo = w.new(S * H, _promote(pdt, sw.dt), rg)
            inv, ar = w.new(S, 8, False), w.new(S, 8, False)
            w.drop(ar)
            if rg:
                w.save(inv)
            wo2 = w.new(S * H, wo.dt, rg)
            w.drop(wo)
            fin = w.new(T * H, wo.dt, rg)
            out = w.cast(fin, x.dt)
            w.drop(*{wo2, sv, perm, pk, xg, xin, sw, hin, hist, offs, gu, dn, inv, bd, fin} - {out, x})
        w.drop(logits, idx, sc)
        saved = lambda *ts: sum((t.nbytes for t in ts if t.sid in w.saved), Lin())  # noqa: E731
        self.moe_late = saved(dn, sw, inv)
        self.moe_tail = Lin()
        self.moe_sw_dt = sw.dt
        self.moe_mid = saved(prod)
        self.moe_act = saved(gu, g2, sg, glu, u3)
        self.moe_dt = pdt
        self.saved_before_down = w.saved_bytes
        return out

    def layer(self, x: Sym, cos_dt: int) -> Sym:
        """One decoder layer; `x` (held) is the residual stream; returns the next one (held)."""
        with self.w.frame():
            return self._layer(x, cos_dt)

    def _layer(self, x: Sym, cos_dt: int) -> Sym:
        m, w, T, H = self.m, self.w, self.T, self.m.hidden_size
        sandwich = m.arch.sandwich_norms
        self.layer_in = x
        if m.arch.post_norms:
            return self._post_norm_layer(x, cos_dt)
        h = self.norm(x, H, T)
        a = self.attention(h, cos_dt)
        w.drop(h)
        if sandwich:
            an = self.norm(a, H, T)
            w.drop(a)
            a = an
        a = self._scaled(a)
        res = w.new(T * H, _promote(x.dt, a.dt), x.rg or a.rg)
        w.drop(x, a)
        h2 = self.norm(res, H, T)
        f = self.mlp(h2)
        w.drop(h2)
        if sandwich:
            fn = self.norm(f, H, T)
            w.drop(f)
            f = fn
        f = self._scaled(f)
        out = w.new(T * H, _promote(res.dt, f.dt), True)
        w.drop(res, f)
        # saved from the down projection on (its LoRA, a sandwich norm): freed before the MLP backward
        self.down_saved = w.saved_bytes - self.saved_before_down
        return out

    def _scaled(self, t: Sym) -> Sym:
        """granite: `out * residual_multiplier` before the residual add, a fresh tensor of out's dtype
        (a Python scalar: nothing saved)."""
        if not self.m.arch.multipliers:
            return t
        o = self.w.new(t.numel, t.dt, t.rg)
        self.w.drop(t)
        return o

    def _post_norm_layer(self, x: Sym, cos_dt: int) -> Sym:
        """olmo2 (Olmo2DecoderLayer): x + norm(attn(x)), then r + norm(mlp(r)) -- no norm on the
        sublayer inputs."""
        w, T, H = self.w, self.T, self.m.hidden_size
        a = self.attention(x, cos_dt)
        an = self.norm(a, H, T)
        w.drop(a)
        res = w.new(T * H, _promote(x.dt, an.dt), x.rg or an.rg)
        w.drop(x, an)
        f = self.mlp(res)
        fn = self.norm(f, H, T)
        w.drop(f)
        out = w.new(T * H, _promote(res.dt, fn.dt), True)
        w.drop(res, fn)
        self.down_saved = w.saved_bytes - self.saved_before_down
        return out


class LayerTrace(NamedTuple):
    """A layer walked once with symbolic sizes, for one model and shape-free plan: every size is a
    (tokens, B*S^2, constant) coefficient triple (`_coef`: a `Lin`'s t and s both count tokens, as
    B*S = T), evaluated at a shape by `activation_profile`."""

    layer: tuple[int, ...]              # one layer's saved set (layers >= 1)
    first_layer: tuple[int, ...]        # layer 0 (saves less when its input does not require grad)
    recompute: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # candidate peaks of a checkpointed
    forward: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]    # recompute / a layer's forward: (total, temps)
    down_saved: tuple[int, ...]         # what the down projection saved (freed as the layer's backward starts)
    copies: tuple[int, ...]             # LoRA weight copies saved by one layer (not layer 0)
    copies_first: tuple[int, ...]       # ... by layer 0
    prod_dt: int                        # dtype bytes of the MLP product (down_proj's input)
    down_out_dt: int                    # dtype bytes of down_proj's output (the gradient arriving there)
    lora_weight_copies: int             # autocast's cache of 16-bit LoRA weights, every layer (bytes)
    inflight: int                       # bytes per [T x H] element in flight at a recompute's start
    attn_saved: tuple[int, ...]         # eager: the layer's saved set once its softmax output is saved
    attn_saved_first: tuple[int, ...]   # ... in layer 0
    moe_late: tuple[int, ...] = (0, 0, 0)  # MoE: saved tensors the experts' backward frees first (down's output...)
    moe_mid: tuple[int, ...] = (0, 0, 0)   # ... and those freed by the down projection's and activation's backward
    moe_dt: int = 0                        # the experts' dtype
    moe_sw_dt: int = 4                     # the routing weights' dtype
    moe_tail: tuple[int, ...] = (0, 0, 0)  # saved after the experts (a shared expert's gated branch)
    moe_act: tuple[int, ...] = (0, 0, 0)   # saved by the experts' activation (silu, mul)
    probs_dt: int = 4                      # eager attention's softmax dtype
    moe_stale: tuple[int, ...] = (0, 0, 0)  # Llama 4: block locals a stopped recompute leaves alive
    moe_stale_shared: tuple[int, ...] = (0, 0, 0)  # ... of which the shared down_proj's (freed by its backward)
    nope_delta: tuple[int, ...] = (0, 0, 0)  # Llama 4: a NoPE layer's saved set minus a RoPE layer's
    input_saved: bool = False           # the layer's input is itself in its saved set
    recompute_first: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()  # layer 0's, when it differs
    nograd: tuple[int, ...] = (0, 0, 0)  # saved bytes made with grad mode off (`Walk.nograd`: FlashAttention-2)
    flash_dt: int = 2                   # FlashAttention-2's input dtype bytes


@shape_free_cache()
def layer_trace(model: ModelSpec, plan: TrainPlan, flags: tuple[bool, bool]) -> LayerTrace:
    """Walk a full layer and layer 0 for `plan` (its batch and sequence length do not matter);
    `flags` = (cpu, fused, masked[, varlen]): the device, whether 4-bit forwards run the fused kernel
    (few tokens on CUDA), whether SDPA gets an attention mask (`sdpa_masked`), and whether
    FlashAttention-2 runs varlen (`flash_varlen`)."""
    cpu, fused, masked, *rest = flags
    varlen = bool(rest and rest[0])
    a = plan.precision.params  # the residual stream starts as the embedding's output
    # enable_input_require_grads (set with checkpointing) makes the embedding output require grad
    input_grad = plan.gradient_checkpointing or plan.method == "full"
    T = Lin(t=1)
    w = Walk()
    lm = LayerModel(model, plan, w, cpu, fused, masked, varlen)
    cos_dt = 4 if model.arch.rope_fp32 else a  # the rotary cos/sin dtype
    x = w.new(T * model.hidden_size, a, True)
    # the layer input is a leaf that requires grad (autocast caches its casts: `_autocast_cast`) in
    # layer 0 when the embedding output is made to require grad, and in every layer a reentrant
    # checkpoint recomputes (it detaches its inputs); non-reentrant recomputes see the original input
    leaf_first = input_grad and plan.method != "full"
    leaf_rest = plan.gradient_checkpointing and plan.use_reentrant
    if leaf_rest:
        lm.leaf_sid = x.sid
    lm.layer(x, cos_dt)
    if input_grad and leaf_first == leaf_rest:
        w0, lm0 = w, lm
    else:
        w0 = Walk()
        lm0 = LayerModel(model, plan, w0, cpu, fused, masked, varlen)
        x0 = w0.new(T * model.hidden_size, a, input_grad)
        if leaf_first:
            lm0.leaf_sid = x0.sid
        lm0.layer(x0, cos_dt)
    copies = 0
    if plan.precision.adapter_copies and plan.method in ("qlora", "lora"):
        rnd = 1 if cpu else 512
        shapes = lora_shapes(model, plan)
        if "router" in expert_targets(model, plan):  # the router's delta B @ A runs under autocast
            shapes = shapes + moe_lora_shapes(model, plan)[:2]
        copies = model.num_layers * sum(round_up(rows * cols * 2, rnd) for rows, cols in shapes)
    nope = Lin()
    if model.layer_rope and not all(model.layer_rope):
        wn = Walk()
        ln = LayerModel(model, plan, wn, cpu, fused, masked, varlen)
        ln.nope = True
        xn = wn.new(T * model.hidden_size, a, True)
        if leaf_rest:
            ln.leaf_sid = xn.sid
        ln.layer(xn, cos_dt)
        nope = wn.saved_bytes - w.saved_bytes
    return LayerTrace(layer=_coef(w.saved_bytes), first_layer=_coef(w0.saved_bytes),
                      recompute=tuple((_coef(t), _coef(s)) for t, s in envelope(w.split(w.last_save, True))),
                      forward=tuple((_coef(t), _coef(s)) for t, s in envelope(w.split(len(w.moments)))),
                      down_saved=_coef(lm.down_saved), copies=_coef(w.copies), copies_first=_coef(w0.copies),
                      prod_dt=lm.prod_dt, down_out_dt=lm.down_out_dt, lora_weight_copies=copies,
                      inflight=inflight_bytes_per_element(a, bool(plan.precision.autocast), plan.method,
                                                          model.arch.sandwich_norms or model.arch.post_norms,
                                                          plan.precision.adapter, model.arch.multipliers),
                      attn_saved=_coef(lm.saved_at_probs), attn_saved_first=_coef(lm0.saved_at_probs),
                      input_saved=x.sid in w.saved,
                      recompute_first=tuple((_coef(t), _coef(s)) for t, s in envelope(w0.split(w0.last_save, True)))
                      if w0 is not w and plan.gradient_checkpointing else (),
                      moe_late=_coef(lm.moe_late), moe_mid=_coef(lm.moe_mid), moe_dt=lm.moe_dt,
                      moe_sw_dt=lm.moe_sw_dt, moe_tail=_coef(lm.moe_tail), moe_act=_coef(lm.moe_act),
                      probs_dt=lm.probs_dt,
                      moe_stale=_coef(lm.moe_stale), moe_stale_shared=_coef(lm.moe_stale_shared),
                      nope_delta=_coef(nope), nograd=_coef(w.nograd_bytes()), flash_dt=lm.flash_dt)


def _coef(x: Lin) -> tuple[int, int, int]:
    return (x.t + x.s, x.q, x.c)


class ActivationProfile(NamedTuple):
    """What one step keeps alive, split the way the moments in `estimate` need it."""

    layer_bytes: int          # one layer's saved set (layers >= 1)
    first_layer_bytes: int    # layer 0 (saves less when its input does not require grad)
    recompute_peak: int       # a checkpointed layer's recompute: live bytes at its last save
    recompute_temps: int      # of which temporaries (made and freed inside one module call)
    forward_peak: int         # a layer's forward: most live bytes (saved so far + locals + transients)
    forward_temps: int        # of which temporaries
    down_saved: int           # what the down projection saved (freed as the layer's backward starts)
    prod_dt: int              # dtype bytes of the MLP product (and of its gradients in flight)
    down_out_dt: int          # dtype bytes of down_proj's output (the gradient arriving there)
    input_in_saved: bool      # the layer input is itself saved (fp32 stream: x.to(float32) is x)
    layer_input_bytes: int    # what a checkpointed layer keeps: its input
    rope_bytes: int           # cos / sin, saved once (packing: and the batch's position ids)
    final_norm_bytes: int     # final norm's saved input + rsqrt
    head_bytes: int           # lm_head: the autocast copy of a frozen fp32 weight, if any
    lora_weight_copies: int   # autocast's cache of bf16 LoRA weights (2 B per LoRA param)
    saved_copies: int         # of which saved for backward by the layers (no checkpointing)
    logits_dt: int            # dtype bytes of the lm_head output
    stream_dt: int
    recompute_inflight: int   # [T x H] gradients in flight while a checkpointed layer recomputes
    mask_bytes: int           # attention masks the model builds once per forward (`attention_masks`)
    attn_saved: int           # eager: a layer's saved set once its softmax output is saved (layers >= 1)
    attn_saved_first: int     # ... layer 0
    probs_bytes: int          # eager: one [B, heads, S, S] fp32 tensor (the softmax's output, or a gradient)
    moe_late: int = 0         # MoE: the layer's saved tensors freed before the down projection's backward
    moe_mid: int = 0          # MoE: the down projection's saved tensors (freed by its backward)
    moe_dt: int = 0           # MoE: the experts' dtype bytes (their gradients in flight)
    moe_sw_dt: int = 4        # MoE: the routing weights' dtype bytes
    moe_tail: int = 0         # MoE: saved after the experts (freed before their backward)
    moe_act: int = 0          # MoE: saved by the experts' activation (freed before the gate_up backward)
    moe_stale: int = 0        # Llama 4: the MoE block's locals a stopped checkpoint recompute leaves alive
    moe_stale_shared: int = 0  # ... of which the shared down_proj's (released by its backward)
    nope_delta: int = 0       # Llama 4: a NoPE layer's saved set minus a RoPE layer's (`layer_bytes`)
    #: granite with checkpointing: the embedding's output, a leaf made to require grad by
    #: enable_input_require_grads, is held by its AccumulateGrad node until backward ends (its
    #: `* embedding_multiplier` copy is the first layer's input)
    embed_leaf_bytes: int = 0
    recompute_peak_first: int = -1   # layer 0's recompute when it differs from the others' (else -1)
    recompute_temps_first: int = 0
    #: of a layer's saved set, what is made with grad mode off (FlashAttention-2's output, softmax_lse,
    #: rng_state): temporaries for the tracker once a checkpointed recompute has made them
    nograd_saved: int = 0
    flash_dt: int = 2  # FlashAttention-2: the kernel's input dtype bytes (q/k/v after transformers' cast)
    #: masks the model's forward builds and no layer takes (`unused_forward_masks`): temporaries of the
    #: model's forward, alive from before layer 0 to the final norm
    forward_masks: int = 0


def _peak(cands: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...], T: int, BSS: int) -> tuple[int, int]:
    """The largest candidate total at this shape, and its temporaries."""
    best = (-1, 0)
    for (t, q, c), (tt, tq, tc) in cands:
        v = t * T + q * BSS + c
        if v > best[0]:
            best = (v, tt * T + tq * BSS + tc)
    return best


def inflight_bytes_per_element(stream_dt: int, autocast: bool, method: str, sandwich: bool = False,
                               adapter_dt: int = 4, scaled: bool = False) -> int:
    """Bytes per [T x H] element of the gradients alive when a checkpointed layer starts recomputing.

    NB: measured on CPU steps (tracker), not derived from the walk: the accumulated gradient of the
    layer's output plus the partial gradients of the layer above still in the autograd engine's
    buffers, whose dtypes follow the regime. fp32 stream: fp32 + 16-bit under autocast, two fp32
    without. 16-bit stream: two 16-bit under autocast; 16-bit + fp32 for QLoRA without autocast;
    two 16-bit + fp32 for LoRA without autocast. Sandwich norms (gemma2/3: the layer ends in a
    norm): the fp32 gradient alone on an fp32 stream, 16-bit + fp32 on a 16-bit one (measured on
    gemma3 over six regimes, tests/test_agreement_cpu.py). 16-bit adapters without autocast ("pure
    16-bit" training): the adapters' partial gradient is 16-bit (fp32 + 16-bit on an fp32 stream, two
    16-bit on a 16-bit one). tests/test_agreement_sim.py has cases
    whose peak is such a recompute at real shapes.
    """
    if scaled:  # granite: the MLP branch's `* residual_multiplier` gradient too, stream dtype
        return stream_dt + inflight_bytes_per_element(stream_dt, autocast, method, sandwich, adapter_dt)
    if sandwich:
        return 4 if stream_dt == 4 else 6
    if stream_dt == 4:
        return 6 if autocast else 4 + adapter_dt
    if autocast or adapter_dt == 2:
        return 4
    return 6 if method == "qlora" else 8


def activation_profile(model: ModelSpec, plan: TrainPlan, cpu: bool) -> ActivationProfile:
    """Evaluate the layer trace (walked once per model and shape-free plan) at `plan`'s batch and
    sequence length. Sizes of whole tensors are rounded to 512 B on CUDA (`g` = the granularity)."""
    B, S = plan.batch_size, plan.seq_len
    T, H, L = B * S, model.hidden_size, model.num_layers
    BSS = T * S
    rows = B if plan.packing else 1  # position_ids from the batch (packing) or arange(S)[None] (the model)
    # CUDA gemm_4bit: the fused kernel for at most 1536 tokens (bitsandbytes backends/cuda/ops.py)
    tr = layer_trace(model, plan, (cpu, not cpu and plan.method == "qlora" and T <= FUSED_4BIT_MAX_TOKENS,
                                   sdpa_masked(model, plan), flash_varlen(plan)))
    pr = plan.precision
    a = pr.params
    g = 1 if cpu else 512
    c0, c1, c2 = tr.copies
    f0, f1, f2 = tr.copies_first
    # torch's reentrant checkpoint recomputes the whole layer (no early stop) and its frames return
    rec, rec_tmp = _peak(tr.forward if plan.use_reentrant else tr.recompute, T, BSS)
    rec0, rec0_tmp = _peak(tr.recompute_first, T, BSS) if tr.recompute_first else (-1, 0)
    fwd, fwd_tmp = _peak(tr.forward, T, BSS)
    lay, first, down = tr.layer, tr.first_layer, tr.down_saved
    at0, at1, at2 = tr.attn_saved
    af0, af1, af2 = tr.attn_saved_first
    return ActivationProfile(
        lay[0] * T + lay[1] * BSS + lay[2], first[0] * T + first[1] * BSS + first[2], rec, rec_tmp, fwd, fwd_tmp,
        # cos/sin [1, S, rope_dim] (partial rotary, Phi-4-mini: 96 of head_dim 128)
        # (fp32 stream: the input norm's x.to(float32) is x; olmo2 has no input norm, and only a LoRA
        # reading x in fp32 without dropout saves it)
        down[0] * T + down[1] * BSS + down[2], tr.prod_dt, tr.down_out_dt, tr.input_saved,
        -(-T * H * a // g) * g,
        # deepseek_v2, Llama 4: one complex64 freqs_cis [1, S, rope_dim/2] (torch.polar); packed rows
        # bring their own position_ids [B, S]: cos/sin [B, S, rope_dim] (`rows`)
        (-(-rows * S * (model.rope_dim // 2) * 8 // g) * g if model.arch.rotary_complex or model.layer_rope else
         2 * (-(-rows * S * (1 if model.arch.rotary_chunked else 2) * (model.rope_dim // 2)
                * (4 if model.arch.rope_fp32 else a) // g) * g))
        # packing: the batch's position_ids [B, S] int64 (the model slices it: alive through the step)
        + (-(-T * 8 // g) * g if plan.packing else 0),
        # final norm: x.to(float32) (a copy unless fp32) and rsqrt; gemma's (1 + weight.float()) too;
        # Liger's RMSNorm saves its input itself (stream dtype) and RSTD
        (-(-T * H * a // g) * g + -(-T * 4 // g) * g) if "rms_norm" in layer_kernels(model, plan) else
        -(-T * H * 4 // g) * g + -(-T * 4 // g) * g + ((-(-H * 4 // g) * g) if model.arch.gemma_norm else 0),
        -(-model.vocab_size * H * 2 // g) * g if pr.autocast and a != 2 else 0,
        tr.lora_weight_copies,
        f0 * T + f1 * BSS + f2 + (L - 1) * (c0 * T + c1 * BSS + c2),
        pr.logits, a,
        _recompute_inflight(model, plan, tr, g),
        attention_masks(model, plan, g),
        at0 * T + at1 * BSS + at2, af0 * T + af1 * BSS + af2,
        # [B, heads, S, S] fp32 (gpt_oss: [B, heads, S, S + 1], the sink column)
        -(-B * model.num_heads * S * (S + model.arch.attention_sinks) * tr.probs_dt // g) * g
        if plan.attn_implementation == "eager" else 0,
        embed_leaf_bytes=-(-T * H * a // g) * g if model.arch.multipliers and plan.gradient_checkpointing
        and plan.method != "full" else 0,
        recompute_peak_first=rec0, recompute_temps_first=rec0_tmp,
        moe_late=sum(c * v for c, v in zip(tr.moe_late, (T, BSS, 1))),
        moe_mid=sum(c * v for c, v in zip(tr.moe_mid, (T, BSS, 1))), moe_dt=tr.moe_dt, moe_sw_dt=tr.moe_sw_dt,
        moe_tail=sum(c * v for c, v in zip(tr.moe_tail, (T, BSS, 1))),
        moe_act=sum(c * v for c, v in zip(tr.moe_act, (T, BSS, 1))),
        moe_stale=sum(c * v for c, v in zip(tr.moe_stale, (T, BSS, 1))),
        moe_stale_shared=sum(c * v for c, v in zip(tr.moe_stale_shared, (T, BSS, 1))),
        nope_delta=sum(c * v for c, v in zip(tr.nope_delta, (T, BSS, 1))),
        nograd_saved=sum(c * v for c, v in zip(tr.nograd, (T, BSS, 1))), flash_dt=tr.flash_dt,
        forward_masks=unused_forward_masks(model, plan, g))


def _recompute_inflight(model: ModelSpec, plan: TrainPlan, tr: LayerTrace, g: int) -> int:
    """The gradients in flight when a checkpointed layer starts recomputing (`inflight_bytes_per_element`).
    Mixture of experts (measured, tracker on CPU steps: gpt_oss, Qwen2-MoE): the layer's output gradient
    [T, H] in the stream dtype and the contiguous copy of the expanded [T·k, H] gradient (the sum over
    k and its view run backward) that reaches `weighted_out[inv_perm]`, whose saved index starts the
    recompute; a shared expert's gated branch ending the block starts it earlier (the output gradient only)."""
    T, H, a = plan.batch_size * plan.seq_len, model.hidden_size, plan.precision.params
    if plan.use_reentrant:
        return -(-T * H * a // g) * g
    if model.is_moe:
        # the layer's first saved tensor unpacked in backward starts the recompute: the experts' unpermute
        # index (gpt_oss, Mixtral, Qwen3-MoE), or, where a shared expert's sigmoid-gated branch ends the
        # block (Qwen2-MoE), that branch's mul -- then only the output gradient is in flight (measured)
        if model.shared_expert_intermediate_size:
            return -(-T * H * a // g) * g
        wo_dt = max(tr.moe_dt, tr.moe_sw_dt)
        return -(-T * H * a // g) * g + -(-T * model.experts_per_token * H * wo_dt // g) * g
    return -(-T * H * tr.inflight // g) * g


def sdpa_masked(model: ModelSpec, plan: TrainPlan) -> bool:
    """Whether SDPA layers get a 4-D mask (then transformers' repeat_kv expands GQA K/V, and each layer
    saves the mask as an additive float mask): a padded batch, or a sliding window shorter than the
    sequence on every layer. NB: families mixing sliding and full layers (gemma2/3, qwen with
    max_window_layers) are walked as their full-attention layers when unpadded."""
    if plan.attn_implementation != "sdpa":
        return False
    if plan.padding != "none" or plan.packing:  # packing: the block-diagonal mask (`packed_rows`)
        return True
    return bool(model.sliding_window) and plan.seq_len >= model.sliding_window and \
        model.attention_types == ("sliding_attention",)


def flash_varlen(plan: TrainPlan) -> bool:
    """Whether FlashAttention-2 takes its varlen path: packed sequences in a batch of one row
    (transformers 5.24 modeling_flash_attention_utils._is_packed_sequence requires batch size 1; packed
    rows in a larger batch run the fixed-length kernel over each whole row)."""
    return plan.attn_implementation == "flash_attention_2" and plan.packing and plan.batch_size == 1


def packed_rows(plan: TrainPlan) -> TrainPlan:
    """The plan as the model sees its batch. `padding_free` (TRL's padding-free collator,
    transformers' DataCollatorWithFlattening): the batch_size rows flattened into one row of
    batch_size x seq_len tokens with position ids restarting per sequence -- a packed batch of one
    row. `packing` rows: [batch_size, seq_len] with restarting position ids (transformers 5.24
    masking_utils.find_packed_sequence_indices then makes SDPA/eager attention block-diagonal,
    `sdpa_masked`; FlashAttention-2 runs varlen). NB: every row full (seq_len tokens), holding at least
    two sequences: the conservative case (one sequence per row gets no mask under SDPA)."""
    if plan.padding_free:
        return plan.replace(batch_size=1, seq_len=plan.tokens, padding_free=False, packing=True)
    return plan


def unused_forward_masks(model: ModelSpec, plan: TrainPlan, granularity: int = 1) -> int:
    """Bytes of the attention masks a model's forward builds and hands to no layer. Qwen2-MoE (5.x:
    Qwen2MoeModel.forward) builds `causal_mask_mapping` with "full_attention" and "sliding_attention"
    for every config, and Qwen2MoeConfig sets `sliding_window = 0` when use_sliding_window is off, so
    SDPA's skip (`_ignore_causal_mask_sdpa`: kv_length < the window) never applies: a bool [B, 1, S, S]
    (expanded over the batch as a view unless padded; eager: a float mask in the embeddings' dtype) no
    layer takes, a local of the model's forward (alive from before layer 0 until the final norm, then
    freed: a temporary; never a layer argument, so not kept for backward under checkpointing).
    Measured with simulate per rank (cut qwen1.5-moe-a2.7b, FSDP2 FULL_SHARD, seq 512): the forward
    phase read -262,144 B without it. FlashAttention-2 builds none."""
    if not model.arch.unused_sliding_mask or "sliding_attention" in model.attention_types:
        return 0  # with sliding layers the mask is a layer argument (`attention_masks`)
    B, S, g = plan.batch_size, plan.seq_len, granularity
    attn = plan.attn_implementation
    if attn == "eager":
        return -(-B * S * S * plan.precision.params // g) * g
    if attn == "sdpa":
        rows = B if plan.padding != "none" or plan.packing else 1
        return -(-rows * S * S // g) * g
    return 0


def attention_masks(model: ModelSpec, plan: TrainPlan, granularity: int = 1) -> int:
    """Bytes of the 4-D attention masks transformers builds once per forward and passes to every
    layer (masking_utils.py; no padding here). Eager: a float mask [B, 1, S, S] in the embeddings'
    dtype per attention type present (`eager_mask`: the bool mask through torch.where). SDPA: the
    full causal mask is skipped (is_causal); a sliding-window layer gets a bool [1, 1, S, S] mask
    (expanded to the batch as a view) once the sequence reaches the window
    (`_ignore_causal_mask_sdpa`); with a padding mask (`plan.padding`) no mask can be skipped and each
    is a bool [B, 1, S, S]. FlashAttention-2 builds none. A checkpointed model keeps them as
    the layers' arguments until backward is done; without checkpointing they die with the forward.
    """
    B, S, g = plan.batch_size, plan.seq_len, granularity
    attn = plan.attn_implementation
    if attn == "eager":
        return len(model.attention_types) * (-(-B * S * S * plan.precision.params // g) * g)
    if attn == "sdpa" and (plan.padding != "none" or plan.packing):  # a padding / packed-sequence mask:
        # no type can skip it; it varies by row
        return len(model.attention_types) * (-(-B * S * S // g) * g)
    if attn == "sdpa" and model.sliding_window and S >= model.sliding_window:
        return -(-S * S // g) * g
    return 0
