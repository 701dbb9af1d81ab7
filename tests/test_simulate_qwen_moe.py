"""Qwen2-MoE and Qwen3-MoE: simulate vs a real CPU step, the parameter inventory, and the MoE block's memory sheet.

Measured with torch 2.13 (CPU), transformers 5.24.0, peft 0.21.2, bitsandbytes 0.50.2 on the default
QLoRA recipe (`TrainPlan()` with `lora_dropout=0`: NF4 + double quant, prepare_model_for_kbit_training,
bf16 autocast, all-linear LoRA r=16 alpha=32, grouped_mm experts -- transformers 5's default, which on
CPU with torch > 2.10 calls `torch.nn.functional.grouped_mm`: routing-independent memory). The sheet is
what phase 2 of issue 10 encodes; `test_moe_block_saved_bytes` and `test_peft_inventory` re-measure its
key lines, and `python tests/test_simulate_qwen_moe.py` prints the whole trace (a TorchDispatchMode
logging every storage the block creates, `torch.autograd.graph.saved_tensors_hooks` marking what autograd
keeps, and the peak of storages created in the block's backward) plus the simulate-vs-CPU table.

Notation: T tokens (batch x seq), H hidden, E experts, k = num_experts_per_tok, S = T*k routed slots,
I = moe_intermediate_size, Is = shared_expert_intermediate_size (Qwen2-MoE), r LoRA rank. fp32 = 4 B.

MEMORY SHEET, one MoE decoder layer (the attention half is the dense qwen2 / qwen3 layer's, FACTS.md)
==================================================================================================

Parameters after load (bnb 4-bit) + prepare + get_peft_model:
- 4-bit (Params4bit, packed [n/2, 1] uint8 + quant state): q/k/v/o_proj; Qwen2-MoE also
  mlp.shared_expert.{gate,up}_proj [Is, H], down_proj [H, Is] and mlp.shared_expert_gate [1, H]
  (an nn.Linear: 4-bit, LoRA-adapted, 32 B packed for H=64).
- 16-bit at load, upcast to fp32 by prepare (they are plain nn.Parameters, not nn.Linear):
  mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I], the router mlp.gate.weight
  [E, H] (Qwen*MoeTopKRouter: an nn.Module holding a Parameter, applied with F.linear), all norms
  (Qwen3: q_norm / k_norm [head_dim]), Qwen2's q/k/v biases. No expert or router biases.
- LoRA, fp32 (peft autocast_adapter_dtype):
  * every 4-bit Linear: A [r, in], B [out, r] (lora.Linear4bit);
  * Qwen3-MoE only -- peft's "all-linear" is rewritten to target_parameters for model types that
    transformers maps to the "qwen2_moe" conversion pattern (qwen3_moe is one; qwen2_moe itself is
    NOT a key of `_MODEL_TO_CONVERSION_PATTERN`, so Qwen2-MoE's experts and router stay un-adapted):
    router mlp.gate (ParamWrapper on a 2-D parameter, rank r): A [r, H], B [E, r];
    experts.gate_up_proj (ParamWrapper, rank 2r -- peft's rank_pattern doubles r and alpha for the
    fused gate+up): A [E*2r, H], B [2I, E*2r]; experts.down_proj (ParamWrapper, rank r):
    A [E*r, I], B [H, E*r]. ParamWrapper refuses lora_dropout != 0 (ValueError at get_peft_model).

Forward of the MoE block, input x = post_attention_layernorm output, fp32 [T, H] (prepare keeps the
stream fp32). In order; [S] = saved for backward (measured), else freed within the block:
Qwen3-MoE (router + merged experts)
  router delta (peft _LoraParameterProxy; mm under autocast): A->bf16 [r,H] [S]; B->bf16 [E,r] [S];
    B@A [E,H] bf16; *scaling [E,H] bf16; ->fp32 [E,H]; W+dW [E,H] fp32 twice (the
    register_parametrization check, then the cached value); W_eff->bf16 [E,H] [S]
  router: x->bf16 [T,H] [S]; logits [T,E] bf16; ->fp32 [T,E]; softmax [T,E] fp32 [S]; topk values
    [T,k] fp32, indices [T,k] int64 [S]; norm_topk_prob: sum [T,1] fp32 [S], then a clone [T,k] fp32
    [S]; ->bf16 [T,k]
  merged experts (peft _LoraFactorsProxy: torch.baddbmm(W, lhs, rhs) in fp32, autocast off; lhs/rhs
    are views of the LoRA weights): W_eff down [E,H,I] fp32 and W_eff gate_up [E,2I,H] fp32, each made
    TWICE per forward (the register_parametrization check copy is freed at once; the copy cached by
    parametrize.cached() is [S] by grouped_mm) -> saved 4*E*3*I*H = 12*E*I*H B per MoE layer, as
    large as the fp32 experts themselves
  grouped_mm_experts_forward: sort values [S] int64; perm [S] int64 [S]; perm//k [S] int64 [S];
    x[perm//k] [S,H] fp32 [S]; weights[perm] [S] bf16 [S]; histc input [S] fp32; histc [E] fp32;
    cumsum offsets [E] int32 [S]; up grouped_mm [S,2I] fp32 [S]; silu(gate) [S,I] fp32 [S];
    silu*up [S,I] fp32 [S]; down grouped_mm [S,H] fp32 [S]; *weights [S,H] fp32; inv_perm [S] int64
    [S]; arange [S] int64; [inv_perm] gather [S,H] fp32; sum over k -> output [T,H] fp32
  saved total = 2rH + 2Er + 2EH + 2TH + 4TE + 8Tk + 4T + 4Tk            (router)
              + 12EIH                                                   (merged experts)
              + 8S + 8S + 4SH + 2S + 4E + 8SI + 4SI + 4SI + 4SH + 8S    (grouped_mm path)
Qwen2-MoE (experts and router frozen: no merged weights; shared expert first)
  shared expert gate/up/down (lora.Linear4bit on CPU: x->bf16, gemm_4bit bf16, ->fp32, clone; LoRA:
    A->bf16 [S], x->bf16 [S], A-out [T,r] bf16 [S], B->bf16 [S], B-out, *scaling, ->fp32, add
    [T,out] fp32 [S]); silu(gate) [T,Is] fp32 [S]; silu*up [T,Is] fp32; down input ->bf16 [T,Is]
  router: W->bf16 [E,H] [S]; x->bf16 [T,H]; logits bf16; ->fp32; softmax [T,E] fp32 [S]; topk
    values fp32, indices int64 [S]; ->bf16 (norm_topk_prob false in the catalogue configs)
  experts: as Qwen3 but x[perm//k] [S,H] and silu*up [S,I] are NOT saved (no weight gradient)
  shared_expert_gate (4-bit Linear [1,H] + LoRA): as above with out = 1; sigmoid [T,1] fp32 [S];
    sigmoid*shared [T,H] fp32; + experts -> output [T,H] fp32
  saved total = 3 LoRA'd 4-bit Linears (2r*in + 2T*in + 2Tr + 2*out*r + 4T*out each) + 4T*Is (silu)
              + 2EH + 4TE + 8Tk + 8S + 8S + 2S + 4E + 8SI + 4SI + 4SH + 8S
              + shared_expert_gate (2rH + 2TH + 2Tr + 2r) + 4T
Backward of the block (largest transient, Qwen3-MoE): grouped_mm's weight gradient dW_eff for
  gate_up [E,2I,H] fp32 and for down [E,H,I] fp32 (created in turn), then baddbmm's backward: bmm and
  *scaling copies [E,2I,2r], [E,2r,H] (gate_up) and [E,H,r], [E,r,I] (down) fp32, then a clone into
  the LoRA B layout. Measured peak of storages created in the block's backward (T=24, H=64, E=8, k=2,
  I=40, r=16): 442,464 B = dW_eff gate_up 4*E*2I*H + its *scaling [E,2I,2r] + bmm and *scaling
  [E,2r,H] (2x) + down's [E,H,r] and [E,r,I] + dx [S,H] fp32 + 2S (asserted at E=6, I=32: 295,008 B).
  NB: measured at small T; at large T the token terms (dx [S,H], the grouped_mm grads [S,2I]) grow.
  Qwen2-MoE: 53,504 B at the same shapes, token-sized only (2x [T,H] fp32, 3x [S,H] fp32, 4S, and the
  shared_expert_gate LoRA grads 4rH + 4r): no weight gradients for experts or router.

Notes for the user (before renting a GPU)
- Only attention (and Qwen2-MoE's shared expert + shared_expert_gate) is 4-bit. The routed experts and
  the router stay 16-bit at load (~96 % of Qwen3-30B-A3B's parameters: 48 x 128 x 3 x 768 x 2048 =
  28.99 B expert weights, 58 GB in bf16) and prepare_model_for_kbit_training upcasts them to fp32
  (116 GB). QLoRA does not make these models small.
- Qwen3-MoE with LoRA on the experts (the default all-linear): peft merges W + BA for the whole
  expert stack each forward and autograd keeps it: +12*E*I*H B per MoE layer (2.4 GB per layer for
  Qwen3-30B-A3B with fp32 experts), for every layer without checkpointing, one layer at a time with it.
- lora_dropout != 0 fails on Qwen3-MoE (lora.ParamWrapper) -> --lora-dropout 0. Qwen2-MoE accepts
  dropout (peft 0.21.2 does not adapt its experts or router at all with "all-linear").
- prepare's fp32 experts cannot run transformers' default grouped_mm on CUDA (bf16 only) -> --no-prepare
  (bf16 experts), or experts_implementation="eager" (a per-expert loop; data-dependent memory).
"""

from __future__ import annotations

import copy
import weakref

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.model import model_from_config  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.runtime.step import cpu_step  # noqa: E402
from memplan.simulate import simulate  # noqa: E402
from sim_checks import assert_simulate_matches  # noqa: E402


_COMMON = dict(max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=384,
               num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=96,
               moe_intermediate_size=32, num_experts_per_tok=2)
CONFIGS = {
    # layer 0 dense (mlp_only_layers), layers 1-2 MoE with a shared expert and its sigmoid gate
    "qwen2_moe": dict(_COMMON, model_type="qwen2_moe", num_hidden_layers=3, num_experts=4, mlp_only_layers=[0],
                      shared_expert_intermediate_size=48),
    # layer 0 dense, layer 1 MoE (decoder_sparse_step 2); q/k norm, head_dim != H / heads, norm_topk_prob
    "qwen3_moe": dict(_COMMON, model_type="qwen3_moe", num_hidden_layers=2, num_experts=6, decoder_sparse_step=2,
                      head_dim=32, norm_topk_prob=True),
}
PLANS = {"gc": dict(), "nogc": dict(gradient_checkpointing=False)}
CASES = [pytest.param(c, p, id=f"{c}-{p}") for c in CONFIGS for p in PLANS]


def _plan(plan_id: str) -> TrainPlan:
    # the default QLoRA recipe, lora_dropout 0 (peft's ParamWrapper refuses dropout on fused experts)
    return TrainPlan(device="cpu", seq_len=32, lora_dropout=0.0, **PLANS[plan_id])


@pytest.mark.parametrize("cfg_id,plan_id", CASES)
def test_simulate_matches_cpu_step(cfg_id, plan_id):
    """Measured: equal to the byte (peak, every term, every phase peak) in all four cases."""
    cfg, plan = CONFIGS[cfg_id], _plan(plan_id)
    real = cpu_step(cfg, plan)
    sim = simulate(cfg, plan)
    assert_simulate_matches(real, sim)


@pytest.mark.parametrize("cfg_id,over", [("qwen2_moe", {}), ("qwen3_moe", {}),
                                         ("qwen2_moe", dict(qkv_bias=False, mlp_only_layers=[], decoder_sparse_step=3)),
                                         ("qwen3_moe", dict(attention_bias=True, decoder_sparse_step=1,
                                                            mlp_only_layers=[1]))],
                         ids=["qwen2_moe", "qwen3_moe", "qwen2_moe-nobias-step3", "qwen3_moe-bias-mlp_only"])
def test_inventory_matches_transformers_per_layer_kind(cfg_id, over):
    """ModelSpec's layer kinds, per-kind Linears and norms, and total equal transformers' meta build."""
    from transformers import AutoModelForCausalLM

    from memplan.runtime.load import hf_config

    cfg = dict(CONFIGS[cfg_id], **over)
    spec = model_from_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(copy.deepcopy(cfg)))
    assert sum(p.numel() for p in model.parameters()) == spec.params
    kinds = tuple("moe" if hasattr(layer.mlp, "experts") else "dense" for layer in model.model.layers)
    assert spec.layer_kinds == kinds and "dense" in kinds and "moe" in kinds
    for layer, kind in zip(model.model.layers, kinds):
        linears = {n: tuple(m.weight.shape) for n, m in layer.named_modules() if type(m) is torch.nn.Linear}
        mine = spec.layer_linears if kind == "moe" else spec.dense_layer_linears
        assert linears == {l.name: (l.out_features, l.in_features) for l in mine}
        biases = {n for n, m in layer.named_modules() if type(m) is torch.nn.Linear and m.bias is not None}
        assert biases == {l.name for l in mine if l.bias}
        other = {n: p.numel() for n, p in layer.named_parameters() if n.rsplit(".", 1)[0] not in linears}
        other.pop("mlp.experts.gate_up_proj", None), other.pop("mlp.experts.down_proj", None)
        norms = spec.layer_norms if kind == "moe" else spec.dense_layer_norms
        assert other == {(n if n.endswith(".weight") else n + ".weight"): k for n, k in norms}
        if kind == "moe":
            ex = layer.mlp.experts
            assert ex.gate_up_proj.numel() + ex.down_proj.numel() == spec.expert_params_per_layer
            assert type(layer.mlp.gate) is not torch.nn.Linear  # the router is a module holding a Parameter


@pytest.mark.parametrize("mt", ["qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("use", [False, True])
def test_sliding_layers_as_the_config_class_resolves_them(mt, use):
    """Qwen2MoeConfig: even layers below max_window_layers slide; Qwen3MoeConfig: all or none."""
    from memplan.arch import ARCHITECTURES, layer_types
    from memplan.runtime.load import hf_config

    cfg = dict(model_type=mt, num_hidden_layers=6, use_sliding_window=use, sliding_window=128, max_window_layers=3,
               hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    hc = hf_config(cfg)
    types, window = layer_types(ARCHITECTURES[mt], cfg, 6)
    assert window == (hc.sliding_window or None)
    if mt == "qwen2_moe":
        assert list(types) == hc.layer_types
    else:
        assert set(types) == {"sliding_attention" if use else "full_attention"}


def test_peft_inventory():
    """What prepare + all-linear LoRA leave on one MoE layer (the sheet's parameter lines)."""
    from memplan.runtime.load import adapt, load_model

    plan = _plan("nogc")
    shapes = {}
    for cfg_id, cfg in CONFIGS.items():
        model = adapt(load_model(cfg, plan), plan)
        mlp = model.base_model.model.model.layers[1].mlp
        shapes[cfg_id] = {n: (tuple(p.shape), str(p.dtype).replace("torch.", ""), type(p).__name__, p.requires_grad)
                          for n, p in mlp.named_parameters()}
    E, H, I, r = 6, 64, 32, 16
    q3 = shapes["qwen3_moe"]
    assert q3 == {
        "experts.base_layer.base_layer.gate_up_proj": ((E, 2 * I, H), "float32", "Parameter", False),
        "experts.base_layer.base_layer.down_proj": ((E, H, I), "float32", "Parameter", False),
        "experts.base_layer.lora_A.default.weight": ((E * 2 * r, H), "float32", "Parameter", True),
        "experts.base_layer.lora_B.default.weight": ((2 * I, E * 2 * r), "float32", "Parameter", True),
        "experts.lora_A.default.weight": ((E * r, I), "float32", "Parameter", True),
        "experts.lora_B.default.weight": ((H, E * r), "float32", "Parameter", True),
        "gate.base_layer.weight": ((E, H), "float32", "Parameter", False),
        "gate.lora_A.default.weight": ((r, H), "float32", "Parameter", True),
        "gate.lora_B.default.weight": ((E, r), "float32", "Parameter", True),
    }
    q2 = shapes["qwen2_moe"]
    E = 4
    assert q2["gate.weight"] == ((E, H), "float32", "Parameter", False)  # router: fp32, not adapted
    assert q2["experts.gate_up_proj"] == ((E, 2 * I, H), "float32", "Parameter", False)
    assert q2["experts.down_proj"] == ((E, H, I), "float32", "Parameter", False)
    assert q2["shared_expert_gate.base_layer.weight"][2] == "Params4bit"
    assert q2["shared_expert_gate.lora_B.default.weight"][0] == (1, r)
    assert not [n for n in q2 if n.startswith(("experts.", "gate.")) and "lora" in n]


class _Storages(torch.utils._python_dispatch.TorchDispatchMode):
    """Every storage an op creates (views and in-place results skipped), with a live flag."""

    def __init__(self):
        super().__init__()
        self.rows, self.alive, self.by_ptr = [], set(), {}
        self.live = [0, 0]  # bytes of live created storages, and their peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        ins = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st.data_ptr() in ins or st.data_ptr() in self.by_ptr or st.nbytes() == 0:
                    continue
                i = len(self.rows)
                self.rows.append((str(func), tuple(t.shape), t.dtype, st.nbytes()))
                self.alive.add(i)
                self.by_ptr[st.data_ptr()] = i
                self.live[0] += st.nbytes()
                self.live[1] = max(self.live)

                def fin(i=i, ptr=st.data_ptr(), n=st.nbytes(), alive=self.alive, by_ptr=self.by_ptr, live=self.live):
                    alive.discard(i)
                    live[0] -= n
                    if by_ptr.get(ptr) == i:
                        del by_ptr[ptr]

                weakref.finalize(st, fin)
        return out


def _block_trace(cfg, T, backward=False):
    """One MoE block (layer 1) of the adapted model on a real fp32 [1, T, H] input under bf16 autocast:
    (bytes autograd saves of storages the block creates, the forward's storages, which were saved,
    which outlived the forward, backward peak of storages created in backward)."""
    from memplan.runtime.load import adapt, load_model

    plan = _plan("nogc")
    model = adapt(load_model(cfg, plan), plan)
    mlp = model.base_model.model.model.layers[1].mlp
    log, saved = _Storages(), set()

    def pack(t):
        i = log.by_ptr.get(t.untyped_storage().data_ptr())
        if i is not None:
            saved.add(i)
        return t

    x = torch.randn(1, T, cfg["hidden_size"], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), log:
        y = mlp(x)
    kept = sum(log.rows[i][3] for i in saved if i in log.alive)
    bwd_peak = 0
    if backward:
        g, b = torch.ones_like(y), _Storages()
        with b:
            y.backward(g)
        bwd_peak = b.live[1]
    return kept, log.rows, saved, set(log.alive), bwd_peak



@pytest.mark.parametrize("cfg_id", list(CONFIGS))
def test_moe_block_saved_bytes(cfg_id):
    """The sheet's saved-bytes formula for one MoE block, against autograd's saved tensors."""
    cfg = CONFIGS[cfg_id]
    T, H, E, k, I, r = 24, cfg["hidden_size"], cfg["num_experts"], cfg["num_experts_per_tok"], cfg[
        "moe_intermediate_size"], 16
    S = T * k
    saved, rows, _, _, bwd_peak = _block_trace(cfg, T, backward=True)
    grouped = 8 * S + 8 * S + 2 * S + 4 * E + 8 * S * I + 4 * S * I + 4 * S * H + 8 * S
    if cfg_id == "qwen3_moe":
        router = 2 * r * H + 2 * E * r + 2 * E * H + 2 * T * H + 4 * T * E + 8 * T * k + 4 * T + 4 * T * k
        merged = 12 * E * I * H
        assert saved == router + merged + grouped + 4 * S * H + 4 * S * I
        # the merged expert stacks are made twice per forward (parametrization check + cached value)
        assert sum(1 for op, shape, dt, _ in rows if "baddbmm" in op and shape == (E, 2 * I, H)) == 2
        # backward: dW_eff of gate_up, baddbmm's bmm / *scaling copies for both stacks, dx of the gather
        assert bwd_peak == (4 * E * 2 * I * H + 4 * E * 2 * I * 2 * r + 2 * 4 * E * 2 * r * H
                            + 4 * E * H * r + 4 * E * r * I + 4 * S * H + 2 * S)
    else:
        Is = cfg["shared_expert_intermediate_size"]

        def lora4bit(out, inp):
            return 2 * r * inp + 2 * T * inp + 2 * T * r + 2 * out * r + 4 * T * out

        shared = lora4bit(Is, H) + lora4bit(Is, H) + lora4bit(H, Is) + 4 * T * Is
        router = 2 * E * H + 4 * T * E + 8 * T * k
        gate = 2 * r * H + 2 * T * H + 2 * T * r + 2 * r + 4 * T
        assert saved == shared + router + grouped + gate
        assert not [op for op, *_ in rows if "baddbmm" in op]
        # NB: token-sized only at these shapes (which moment peaks depends on T, H, Is)
        assert bwd_peak == 2 * 4 * T * H + 4 * r + 4 * r * H + 3 * 4 * S * H + 4 * S


if __name__ == "__main__":  # print the block traces and the simulate-vs-CPU table
    import warnings

    warnings.simplefilter("ignore")
    for cfg_id, cfg in CONFIGS.items():
        kept, rows, saved, alive, bwd = _block_trace(cfg, 24, backward=True)
        print(f"== {cfg_id} MoE block, T=24: saved {kept} B; backward peak (created in backward) {bwd} B")
        for i, (op, shape, dt, nb) in enumerate(rows):
            flag = "SAVED" if i in saved and i in alive else ("kept" if i in alive else "")
            print(f"  {i:3d} {op:40s} {str(shape):14s} {str(dt):15s} {nb:7d} {flag}")
    print(f"{'config-plan':24s} {'cpu_step B':>12s} {'simulate B':>12s}")
    for cfg_id, cfg in CONFIGS.items():
        for plan_id in PLANS:
            real, sim = cpu_step(cfg, _plan(plan_id)), simulate(cfg, _plan(plan_id))
            print(f"{cfg_id + '-' + plan_id:24s} {real.peak_bytes:12d} {sim.peak_bytes:12d}")
