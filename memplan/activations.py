"""What a training step saves for backward: a symbolic walk of one decoder layer and the model ends.

Instead of one closed formula per regime, the walk follows the ops that transformers 5.24, peft 0.21
and bitsandbytes 0.50 run (see FACTS.md) on symbolic tensors that know their size, dtype, storage and
whether they require grad, and records what autograd saves. Storages are shared the way the real ops
share them (views, no-op casts), so q/k/v sharing one saved input, dropout masks, autocast copies and
fused projections fall out of the same few rules. Everything is plain integer arithmetic: a layer
walk costs a few microseconds.

The three regimes of FACTS.md are reproduced by it:
R1 prepare, no autocast: fp32 stream and adapters; R2 prepare + bf16 autocast (the HF default);
R3 no prepare, 16-bit model, fp32 LoRA, no autocast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

from .model import Linear, ModelSpec
from .plan import TrainPlan
from .units import round_up

_ids = count()


@dataclass(eq=False)
class Storage:
    nbytes: int
    sid: int = field(default_factory=lambda: next(_ids))


@dataclass(eq=False)
class Sym:
    """A symbolic tensor: `numel` elements of `dt` bytes in `storage`; `rg` = requires grad."""

    numel: int
    dt: int
    storage: Storage
    rg: bool = True

    @property
    def nbytes(self) -> int:
        return self.numel * self.dt


@dataclass
class Walk:
    """Saved-for-backward bookkeeping over symbolic tensors (one layer or the model ends)."""

    rnd: int = 1  # 512 on CUDA: every allocation rounds up
    saved: dict[int, int] = field(default_factory=dict)
    transient_peak: int = 0
    copies: int = 0  # saved autocast copies of LoRA weights (also held by autocast's cache)

    def new(self, numel: int, dt: int, rg: bool = True) -> Sym:
        n = numel * dt
        return Sym(numel, dt, Storage(round_up(n, self.rnd) if self.rnd > 1 else n), rg)

    def view(self, t: Sym, numel: int | None = None) -> Sym:
        return Sym(t.numel if numel is None else numel, t.dt, t.storage, t.rg)

    def cast(self, t: Sym, dt: int) -> Sym:
        return t if t.dt == dt else self.new(t.numel, dt, t.rg)

    def save(self, *ts: Sym) -> None:
        for t in ts:
            self.saved[t.storage.sid] = t.storage.nbytes

    def transient(self, nbytes: int) -> None:
        self.transient_peak = max(self.transient_peak, nbytes)

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved.values())


def _promote(a: int, b: int) -> int:
    return max(a, b)


class LayerModel:
    """Walks one decoder layer of `model` under `plan` (T tokens, B sequences of S)."""

    def __init__(self, model: ModelSpec, plan: TrainPlan, walk: Walk, cpu: bool):
        self.m, self.p, self.w, self.cpu = model, plan, walk, cpu
        self.T = plan.batch_size * plan.seq_len
        self.ac = 2 if plan.autocast else 0  # autocast dtype bytes (bf16/fp16 both 2), 0 = off
        self.weights_dt = 4 if plan.prepare else (4 if plan.dtype == "fp32" else 2)
        self.quantized = plan.method == "qlora"
        self.full = plan.method == "full"
        self.adapter_dt = 4  # peft autocast_adapter_dtype=True upcasts LoRA to fp32
        self.r = plan.lora_r
        self.dropout = plan.lora_dropout if plan.method in ("qlora", "lora") else 0.0
        self.last_transient = 0  # forward transients of the latest Linear (dequantized weight, casts)
        self.down_saved = self.prod_dt = self.mlp_input_extra = 0

    # ---- targets ---------------------------------------------------------------------------------
    def targeted(self, lin: Linear) -> bool:
        if self.p.method not in ("qlora", "lora"):
            return False
        tm = self.p.target_modules
        if tm == "all-linear":
            return lin.kind != "head"
        leaf = lin.name.rsplit(".", 1)[-1]
        return leaf in tm or lin.name in tm

    # ---- blocks ------------------------------------------------------------------------------------
    def norm(self, x: Sym, dim: int, rows: int) -> Sym:
        """RMSNorm over `dim` for `rows` vectors (llama: weight * h.to(in); gemma: h * (1 + w))."""
        w = self.w
        x32 = w.cast(x, 4)
        rs = w.new(rows, 4, x.rg)
        if x.rg:
            w.save(x32, rs)
        if self.m.family == "gemma":
            if x.rg:
                w.save(w.new(dim, 4, False))  # (1 + weight.float()) is a fresh tensor, saved by the mul
            h = w.new(x.numel, 4, x.rg)
            if self.full:
                w.save(x32)  # NB: weight grad needs the normalised h; approximated by one more copy
            return w.cast(h, x.dt)
        h = w.new(x.numel, 4, x.rg)
        hc = w.cast(h, x.dt)
        out_dt = _promote(self.weights_dt if not self.full else self.weights_dt, x.dt)
        if self.full and x.rg:
            w.save(hc)
        return w.new(x.numel, out_dt, x.rg) if out_dt != hc.dt or True else hc

    def linear(self, x: Sym, lin: Linear) -> Sym:
        """A base Linear (4-bit, 8-bit or 16-bit) and its LoRA adapter, as peft runs them."""
        w, T = self.w, self.T
        n_out = T * lin.out_features
        cd = 4 if self.p.compute_dtype == "fp32" else 2
        if self.quantized:
            # bnb: x.to(compute dtype), dequantize W (+ fp32 absmax with double quant), F.linear, .to(x dtype)
            nb = -(-lin.numel // 64)
            self.last_transient = ((T * lin.in_features * cd if x.dt != cd else 0) + lin.numel * cd
                                   + (4 * nb if self.p.double_quant else 0) + n_out * cd)
            out = w.new(n_out, x.dt, x.rg)
            if self.p.quant != "int8":
                out = w.new(n_out, x.dt, x.rg)  # peft Linear4bit clones the base output
        else:
            wdt = self.weights_dt
            if self.ac:
                xc = w.cast(x, self.ac)
                wc_bytes = 0 if wdt == self.ac else lin.numel * self.ac
                self.last_transient = (T * lin.in_features * self.ac if x.dt != self.ac else 0) + wc_bytes + n_out * self.ac
                if self.full:
                    if x.rg or True:
                        w.save(xc)
                    if wc_bytes:
                        w.save(w.new(lin.numel, self.ac, False))
                elif x.rg and wc_bytes:
                    w.save(w.new(lin.numel, self.ac, False))  # frozen W's autocast copy, saved for dX
                out = w.new(n_out, self.ac, True)
            else:
                self.last_transient = n_out * _promote(wdt, x.dt)
                if self.full:
                    w.save(w.cast(x, wdt))
                out = w.new(n_out, _promote(wdt, x.dt), x.rg or self.full)
        if not self.targeted(lin):
            return out
        # ---- LoRA: lora_B(lora_A(dropout(x))) * scaling added to the base output ----
        r = self.r
        if self.ac:
            # autocast casts the fp32 LoRA weights to bf16 (cached); a linear saves W for dX when X needs grad
            copies = [w.new(lin.out_features * r, self.ac, False)]
            if x.rg:
                copies.append(w.new(r * lin.in_features, self.ac, False))
            w.save(*copies)
            w.copies += sum(c.storage.nbytes for c in copies)
            xa = x if self.quantized else w.cast(x, self.adapter_dt)  # lora.Linear casts x to fp32
            if self.dropout > 0:
                xa = self._dropout(xa)
            a_in = w.cast(xa, self.ac)
            w.save(a_in)
            a = w.new(T * r, self.ac)
            w.save(a)
            out_dt = _promote(out.dt, self.ac)
            return w.new(n_out, out_dt) if True else out
        xa = w.cast(x, self.adapter_dt)
        if self.dropout > 0:
            xa = self._dropout(xa)
        w.save(xa)
        a = w.new(T * r, self.adapter_dt)
        w.save(a)
        return w.new(n_out, out.dt)  # output.to(expected dtype): the base output's dtype

    def _dropout(self, x: Sym) -> Sym:
        w = self.w
        mask = w.new(x.numel, x.dt if self.cpu else 1, False)  # CPU: full-dtype noise; CUDA: bool
        if x.rg:  # no backward through dropout when its input needs no grad (layer 0 without the hook)
            w.save(mask)
        return w.new(x.numel, x.dt, x.rg)

    def attention(self, x: Sym, cos_dt: int) -> Sym:
        m, w, T, B, S = self.m, self.w, self.T, self.p.batch_size, self.p.seq_len
        lins = {l.name.rsplit(".", 1)[-1]: l for l in m.layer_linears}
        if "qkv_proj" in lins:
            qkv = self.linear(x, lins["qkv_proj"])
            q = w.view(qkv, T * m.q_dim)
            k = w.view(qkv, T * m.kv_dim)
            v = w.view(qkv, T * m.kv_dim)
        else:
            q = self.linear(x, lins["q_proj"])
            k = self.linear(x, lins["k_proj"])
            v = self.linear(x, lins["v_proj"])
        if m.model_type in ("qwen3", "gemma3_text"):
            q = self.norm(q, m.head_dim, T * m.num_heads)
            k = self.norm(k, m.head_dim, T * m.num_kv_heads)
        # rotary: q * cos + rotate_half(q) * sin (cos/sin saved once at model level)
        q = w.new(q.numel, _promote(q.dt, cos_dt))
        k = w.new(k.numel, _promote(k.dt, cos_dt))
        attn = self.p.attn_implementation
        cdt = self.ac or q.dt
        if attn == "eager":
            return self._eager(q, k, v, lins["o_proj"])
        # SDPA with enable_gqa (no mask, head_dim <= 256) runs on the KV heads; otherwise repeat_kv copies
        if m.head_dim > 256 and m.num_kv_heads != m.num_heads and attn == "sdpa":
            k = w.new(T * m.q_dim, k.dt)
            v = w.new(T * m.q_dim, v.dt)
        qc, kc, vc = (w.cast(t, cdt) if self.ac else t for t in (q, k, v))
        if not self.ac and len({qc.dt, kc.dt, vc.dt}) > 1:  # sdpa needs one dtype; transformers casts
            qc, kc, vc = (w.cast(t, max(q.dt, k.dt, v.dt)) for t in (qc, kc, vc))
        out = w.new(T * m.q_dim, qc.dt)
        heads_rows = B * m.num_heads * (S if self.cpu or attn == "flash_attention_2" else round_up(S, 32))
        lse = w.new(heads_rows, 4, False)
        w.save(qc, kc, vc, out, lse)
        if self.cpu and self.ac:
            # NB: measured on CPU under autocast: o_proj receives an fp32 copy of the attention output
            # (its LoRA then saves a bf16 cast of it); elsewhere the kernel's output is used in place.
            out = w.new(out.numel, 4)
        return self.linear(out, lins["o_proj"])

    def _eager(self, q: Sym, k: Sym, v: Sym, o_proj: Linear) -> Sym:
        m, w, B, S = self.m, self.w, self.p.batch_size, self.p.seq_len
        if m.num_kv_heads != m.num_heads:
            k = w.new(self.T * m.q_dim, k.dt)
            v = w.new(self.T * m.q_dim, v.dt)
        cdt = self.ac or q.dt
        qc, kc, vc = (w.cast(t, cdt) if self.ac else t for t in (q, k, v))
        probs_n = B * m.num_heads * S * S
        # matmul saves q, k; softmax in fp32 saves its output; .to(q dtype) copy saved by the next matmul
        w.save(qc, kc)
        sm = w.new(probs_n, 4)
        w.save(sm)
        pc = w.cast(sm, qc.dt)
        w.save(pc, vc)
        out = w.new(self.T * m.q_dim, qc.dt)
        out = w.new(out.numel, out.dt)  # transpose(1, 2).contiguous()
        return self.linear(out, o_proj)

    def mlp(self, x: Sym) -> Sym:
        m, w, T, I = self.m, self.w, self.T, self.m.intermediate_size
        lins = {l.name.rsplit(".", 1)[-1]: l for l in m.layer_linears}
        if "gate_up_proj" in lins:
            gu = self.linear(x, lins["gate_up_proj"])
            g, u = w.view(gu, T * I), w.view(gu, T * I)
        else:
            g = self.linear(x, lins["gate_proj"])
            u = self.linear(x, lins["up_proj"])
        act = w.new(g.numel, g.dt)
        w.save(g)  # silu / gelu(tanh) backward needs the input
        prod = w.new(g.numel, _promote(act.dt, u.dt))
        w.save(act, u)
        before = w.saved_bytes
        out = self.linear(prod, lins["down_proj"])
        self.down_saved = w.saved_bytes - before  # freed first when the layer's backward starts
        self.prod_dt = prod.dt
        self.mlp_input_extra = 0 if x.storage.sid in w.saved else x.storage.nbytes  # alive as an argument
        return out

    def layer(self, x: Sym, cos_dt: int) -> Sym:
        """One decoder layer; returns its output (the next residual stream)."""
        m, w, T, H = self.m, self.w, self.T, self.m.hidden_size
        h = self.norm(x, H, T)
        a = self.attention(h, cos_dt)
        if m.model_type in ("gemma2", "gemma3_text"):
            a = self.norm(a, H, T)
        res = w.new(T * H, _promote(x.dt, a.dt), x.rg or a.rg)
        if m.model_type in ("gemma2", "gemma3_text"):
            h2 = self.norm(res, H, T)
            f = self.norm(self.mlp(h2), H, T)
        elif m.is_moe:
            raise NotImplementedError  # handled by the caller (simulate)
        else:
            f = self.mlp(self.norm(res, H, T))
        return w.new(T * H, _promote(res.dt, f.dt), True)


def stream_dtype(model: ModelSpec, plan: TrainPlan) -> int:
    """Bytes per element of the residual stream: the embedding's dtype (fp32 after prepare)."""
    if plan.prepare or plan.dtype == "fp32":
        return 4
    return 2


@dataclass(frozen=True)
class ActivationProfile:
    """Saved bytes for one step, split the way the phase model needs them."""

    layer_bytes: int          # one full layer's saved set (layers >= 1)
    last_transient: int       # forward transients of a layer's last Linear (peak of a recompute)
    down_saved: int           # what the last Linear saved (freed as the layer's backward starts)
    prod_dt: int              # dtype bytes of the MLP product (and of its gradients in flight)
    mlp_input_extra: int      # the MLP input, alive as an argument during the MLP, when not saved
    input_in_saved: bool      # the layer input is itself saved (fp32 stream: x.to(float32) is x)
    first_layer_bytes: int    # layer 0 (saves less when its input does not require grad)
    layer_input_bytes: int    # what a checkpointed layer keeps: its input
    rope_bytes: int           # cos / sin, saved once
    final_norm_bytes: int     # final norm's saved input + rsqrt
    head_bytes: int           # lm_head: the autocast copy of a frozen fp32 weight, if any
    lora_weight_copies: int   # autocast copies of LoRA weights (2 B per LoRA param under autocast)
    saved_copies: int         # of which saved for backward by the layers (no checkpointing)
    logits_dt: int            # dtype bytes of the lm_head output
    stream_dt: int


def activation_profile(model: ModelSpec, plan: TrainPlan, cpu: bool) -> ActivationProfile:
    rnd = 1 if cpu else 512
    T, H, S = plan.tokens, model.hidden_size, plan.seq_len
    a = stream_dtype(model, plan)
    input_grad = plan.gradient_checkpointing  # enable_input_require_grads hook on the embeddings

    w = Walk(rnd)
    lm = LayerModel(model, plan, w, cpu)
    lm.layer(w.new(T * H, a, True), a)
    full = w.saved_bytes
    w0 = Walk(rnd)
    LayerModel(model, plan, w0, cpu).layer(w0.new(T * H, a, input_grad or plan.method == "full"), a)
    first = w0.saved_bytes

    r = lambda n: round_up(n, rnd) if rnd > 1 else n  # noqa: E731
    rope = 2 * r(S * model.head_dim * a)
    final_norm = r(T * H * 4) + r(T * 4)  # x.to(float32) (a copy unless fp32) and rsqrt
    head_w = 0
    logits_dt = 4
    head_frozen_dt = 4 if plan.prepare else (4 if plan.dtype == "fp32" else 2)
    if plan.autocast:
        logits_dt = 2
        if head_frozen_dt != 2:
            head_w = r(model.vocab_size * H * 2)
    else:
        logits_dt = head_frozen_dt
    copies = 0  # autocast's cache of bf16 LoRA weights, alive until autocast exits (after the loss)
    if plan.autocast and plan.method in ("qlora", "lora"):
        from .formulas import lora_tensors

        copies = sum(r(numel * 2) for numel in lora_tensors(model, plan))
    x_in = w.new(T * H, a, True)
    return ActivationProfile(full, lm.last_transient, lm.down_saved, lm.prod_dt, lm.mlp_input_extra, a == 4, first, r(T * H * a), rope, final_norm, head_w, copies, w0.copies + (model.num_layers - 1) * w.copies, logits_dt, a)
