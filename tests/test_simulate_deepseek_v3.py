"""simulate vs a real CPU step for the DeepSeek MoE family (deepseek_v3, deepseek_v2), and the memory
sheet of its MoE block that the closed form (phase 2 of issue 10) will encode.

Cases: a tiny random-init model of each model_type (hidden 64, 2 layers: one dense-MLP layer
(first_k_dense_replace 1) then one MoE layer, 8 routed experts, top-2, 2 shared experts, group-limited
routing over 2 groups, vocab 512); deepseek_v3 with q_lora_rank (q_a_proj/q_a_layernorm/q_b_proj),
deepseek_v2 with q_lora_rank null (q_proj) and a softmax group_limited_greedy router. Plan: the
default QLoRA recipe with lora_dropout 0 (peft's ParamWrapper refuses dropout on the fused experts),
with and without gradient checkpointing. Measured (torch 2.13, transformers 5.24, peft 0.21.2,
bitsandbytes 0.50.2, seq 64): simulate equals the real CPU step to the byte (peak, every term, every
phase peak) in all four cases: deepseek_v3 1,819,160 B (GC) / 2,453,048 B (no GC), deepseek_v2
1,770,376 B (GC) / 2,393,128 B (no GC); the table is printed by `python
tests/test_simulate_deepseek_v3.py`. Both paths run transformers' default `grouped_mm` experts on CPU
(data-independent: every one of the T·k token slots goes through one grouped matmul), so no balanced
routing is imposed. What simulate needed: on CPU, torch's SDPA takes the math kernel when v's head
dim differs from q/k's (MLA: qk_nope + qk_rope vs v_head_dim), which the meta flash kernel would
get wrong (`memplan.simulate.emulation.cpu_flash_head_dims`, patch 2b).

Memory sheet: one MoE decoder layer's `mlp` (DeepseekV3MoE), default QLoRA recipe
(prepare_model_for_kbit_training, bf16 autocast, target_modules="all-linear", r=16, alpha 32,
dropout 0, grouped_mm), measured on CPU with memplan's live-tensor tracker and
`torch.autograd.graph.saved_tensors_hooks` (T=40 tokens, H=64, E=8, k=2, I=I_moe=24, Is=48 =
n_shared·I_moe, r=16: the figures quoted below; `test_moe_block_memory_sheet` re-measures the
formulas on this file's config, I=32, Is=64). T tokens, H hidden, E routed
experts, k experts per token, I moe_intermediate_size, Is = n_shared_experts·I, r LoRA rank.

Parameters after prepare + get_peft_model (one MoE layer):
- Params4bit (uint8 packed, 4-bit NF4, double quant), the nn.Linear of the layer: self_attn.q_a_proj
  [q_lora, H], q_b_proj [heads·(nope+rope), q_lora] (or q_proj [heads·(nope+rope), H] when
  q_lora_rank is null), kv_a_proj_with_mqa [kv_lora + rope, H], kv_b_proj [heads·(nope+v), kv_lora],
  o_proj [H, heads·v], mlp.shared_experts.gate_proj / up_proj [Is, H], down_proj [H, Is]. The dense
  layers' mlp.gate_proj/up_proj [intermediate_size, H], down_proj [H, intermediate_size] likewise.
- 16-bit in the checkpoint, upcast to fp32 by prepare (every non-Params4bit floating parameter):
  mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I] (fused 3-D parameters, never
  quantized by bitsandbytes), the norms (input_layernorm, post_attention_layernorm [H],
  q_a_layernorm [q_lora], kv_a_layernorm [kv_lora]).
- fp32 from construction (kept fp32 at load, `_keep_in_fp32_modules_strict`): the router weight
  mlp.gate.weight [E, H] (a Parameter of DeepseekV3TopkRouter, not an nn.Linear) and, deepseek_v3 only,
  the buffer mlp.gate.e_score_correction_bias [E].
LoRA (peft 0.21.2 maps all-linear on deepseek_v2/v3 through its qwen2_moe conversion,
peft/utils/transformers_weight_conversion.py `_convert_peft_config_moe`): target_modules = the
attention Linears only; the leaf names gate_proj/up_proj/down_proj become target_parameters
gate_up_proj/down_proj and `gate` becomes gate.weight. So the shared experts and the dense layers'
MLP get NO LoRA. All adapters fp32:
- router ParamWrapper (gate.weight): lora_A [r, H], lora_B [E, r]; forward merges W + (B·A)·α/r [E, H].
- experts ParamWrapper (gate_up_proj), rank 2r and alpha 2α (peft's rank_pattern/alpha_pattern for
  the fused pair): lora_A [E·2r, H], lora_B [2I, E·2r]; forward merges W + ΔW [E, 2I, H] (fp32).
- experts ParamWrapper (down_proj), rank r: lora_A [E·r, I], lora_B [H, E·r]; merges [E, H, I] (fp32).
- LoRA parameters per MoE layer in the MoE block: r·(H + E + 3·E·H + 5·E·I) (measured 41,088).

Forward of the MoE block, in order (input x [T, H] fp32: the residual stream is fp32 after prepare).
KEPT = alive when the forward returns (held by the autograd graph), else freed before it returns:
  router: lora_A→bf16 [r,H] 2rH KEPT; lora_B→bf16 [E,r] 2Er KEPT; B·A bf16 [E,H], ×scale bf16,
  →fp32 [E,H], W+Δ fp32 [E,H] (×2) freed; merged W→bf16 [E,H] 2EH KEPT; x→bf16 [T,H] 2TH KEPT;
  logits mm [T,E] bf16 2TE KEPT; v3: sigmoid [T,E] bf16 2TE KEPT (v2: softmax [T,E] fp32 4TE KEPT,
  its fp32 input copy freed); group scores, group top-k, mask, masked_fill [T,E] fp32 freed
  (v2 keeps the bool mask [T,E] 1TE); top-k indices [T,k] int64 8Tk KEPT; v3: normalising
  denominator [T,1] bf16 2T, a clone of the top-k weights [T,k] bf16 2Tk (in-place division) and
  ×routed_scaling_factor [T,k] bf16 2Tk KEPT (v2: ×routed_scaling_factor [T,k] fp32 4Tk KEPT).
  experts (grouped_mm): merged down [E,H,I] fp32 4EHI and merged gate_up [E,2I,H] fp32 8EIH freed
  (peft computes each merged weight twice; the first pair is transient); sort values [Tk] int64
  freed, sort indices [Tk] int64 8Tk KEPT, token index [Tk] int64 8Tk KEPT, gathered x [Tk,H] fp32
  4TkH KEPT, sorted routing weights [Tk] (v3 bf16 2Tk, v2 fp32 4Tk) KEPT, their fp32 copy and histc
  freed, offsets [E] int32 4E KEPT; merged gate_up [E,2I,H] fp32 8EIH KEPT; grouped_mm [Tk,2I] fp32
  8TkI KEPT; silu [Tk,I] 4TkI KEPT; act·up [Tk,I] 4TkI KEPT; merged down [E,H,I] fp32 4EHI KEPT;
  grouped_mm [Tk,H] fp32 4TkH KEPT; ×weights [Tk,H] freed; inverse permutation [Tk] int64 8Tk
  KEPT; arange and unsorted [Tk,H] freed; sum over k [T,H] fp32 4TH KEPT.
  shared experts (three Linear4bit, no LoRA; CPU: dequantize + F.linear, as FACTS.md): per Linear
  x→bf16 (gate and up each cast x again) [T,H], dequantized absmax fp32 [n/64] ... and weight bf16
  [out,in], bf16 output all freed; gate out→fp32 [T,Is] 4TIs KEPT, silu [T,Is] fp32 4TIs KEPT, up
  out→fp32 [T,Is] 4TIs KEPT, act·up fp32 and its bf16 cast freed, down out→fp32 [T,H] 4TH KEPT;
  block output x_experts + x_shared [T,H] fp32 4TH KEPT.
  Total KEPT (v3) = 2rH + 2Er + 2EH + 2TH + 4TE + 12Tk + 2T        (router)
                  + 12·E·I·H + Tk·(8H + 16I + 26) + 4E + 4TH       (experts)
                  + 12·T·Is + 8TH                                   (shared experts + output)
  = 285,776 B measured (formula: 10,768 + 231,488 + 43,520). v2: 286,816 B.
  Largest forward transient: the first merged pair 4EHI + 8EIH (alive together with the kept set).

Backward of the MoE block: the largest set of bytes it allocates that is alive at once (measured
354,464 B v3, 354,624 B v2): grad of the merged gate_up weight [E,2I,H] fp32 8EIH + the two grads
of gate_up's lora_A view [E,2r,H] fp32 2·8ErH (one becomes lora_A.grad) + gate_up lora_B's grad
[E,2I,2r] fp32 16EIr + down lora_B's grad [E,H,r] fp32 4EHr + down lora_A.grad [E,r,I] 4ErI +
grad of the gathered input [Tk,H] fp32 4TkH + grad of x [T,H] 4TH + [Tk,1] bf16 2Tk. The LoRA grads
that stay after backward: router 4r(H+E), gate_up 4·2r·E·(H+2I), down 4·r·E·(I+H) (+ x.grad 4TH) =
174,592 B measured.
"""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.plan import TrainPlan  # noqa: E402
from memplan.runtime.step import cpu_step  # noqa: E402
from memplan.simulate import simulate  # noqa: E402
from sim_checks import assert_simulate_matches  # noqa: E402


_COMMON = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, vocab_size=512, kv_lora_rank=16,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
               n_shared_experts=2, n_group=2, topk_group=1, first_k_dense_replace=1,
               max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    # q_a_proj / q_a_layernorm / q_b_proj, sigmoid router with e_score_correction_bias
    "deepseek_v3": dict(_COMMON, model_type="deepseek_v3", q_lora_rank=32),
    # q_proj (q_lora_rank null, as DeepSeek-V2-Lite and Moonlight), softmax group-limited router
    "deepseek_v2": dict(_COMMON, model_type="deepseek_v2", q_lora_rank=None, topk_method="group_limited_greedy"),
}
PLANS = {
    "qlora-gc-drop0": dict(seq_len=64, lora_dropout=0.0),
    "qlora-nogc-drop0": dict(seq_len=64, lora_dropout=0.0, gradient_checkpointing=False),
}
CASES = [pytest.param(c, p, id=f"{c}-{p}") for c in CONFIGS for p in PLANS]
_ROWS: list[tuple[str, int, int]] = []


def _plan(plan_id: str) -> TrainPlan:
    return TrainPlan(**PLANS[plan_id], device="cpu")


@pytest.mark.parametrize("cfg_id,plan_id", CASES)
def test_simulate_matches_cpu_step(cfg_id, plan_id):
    cfg, plan = CONFIGS[cfg_id], _plan(plan_id)
    real = cpu_step(cfg, plan)
    sim = simulate(cfg, plan)
    _ROWS.append((f"{cfg_id}-{plan_id}", real.peak_bytes, sim.peak_bytes))
    assert_simulate_matches(real, sim)


def _adapted(cfg_id: str, T: int = 40):
    from memplan.runtime.load import adapt, load_model

    plan = TrainPlan(seq_len=T, device="cpu", lora_dropout=0.0, gradient_checkpointing=False)
    return adapt(load_model(CONFIGS[cfg_id], plan), plan)


@pytest.mark.parametrize("cfg_id", list(CONFIGS))
def test_real_stack_layout(cfg_id):
    """What the memory sheet rests on: grouped_mm experts on CPU, fp32 experts and router after
    prepare, 4-bit only for nn.Linear, and peft's all-linear adapting attention + router + experts
    (rank 2r on the fused gate_up) but not the shared experts or the dense MLP."""
    import bitsandbytes as bnb

    model = _adapted(cfg_id)
    base = model.get_base_model()
    assert base.config._experts_implementation == "grouped_mm"
    cfg, r = CONFIGS[cfg_id], 16
    E, H, I = cfg["n_routed_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    moe = dict(base.model.layers[1].named_parameters())
    assert moe["mlp.experts.base_layer.base_layer.gate_up_proj"].dtype == torch.float32
    assert tuple(moe["mlp.experts.base_layer.base_layer.gate_up_proj"].shape) == (E, 2 * I, H)
    assert moe["mlp.gate.base_layer.weight"].dtype == torch.float32
    assert tuple(moe["mlp.experts.base_layer.lora_A.default.weight"].shape) == (E * 2 * r, H)
    assert tuple(moe["mlp.experts.base_layer.lora_B.default.weight"].shape) == (2 * I, E * 2 * r)
    assert tuple(moe["mlp.experts.lora_A.default.weight"].shape) == (E * r, I)
    assert tuple(moe["mlp.experts.lora_B.default.weight"].shape) == (H, E * r)
    assert tuple(moe["mlp.gate.lora_A.default.weight"].shape) == (r, H)
    assert tuple(moe["mlp.gate.lora_B.default.weight"].shape) == (E, r)
    moe_lora = sum(p.numel() for n, p in moe.items() if "lora_" in n and n.startswith("mlp."))
    assert moe_lora == r * (H + E + 3 * E * H + 5 * E * I)
    for layer, prefix in ((base.model.layers[1], "mlp.shared_experts."), (base.model.layers[0], "mlp.")):
        for leaf in ("gate_proj", "up_proj", "down_proj"):
            mod = layer.get_submodule(prefix + leaf)
            assert type(mod) is bnb.nn.Linear4bit, (prefix + leaf, type(mod))  # 4-bit, no LoRA wrapper
    assert model.peft_config["default"].rank_pattern == {r".*\.gate_up_proj": 2 * r}


def test_moe_block_memory_sheet():
    """The module docstring's forward/backward figures, re-measured on the deepseek_v3 MoE block."""
    from memplan.runtime.tracker import LiveTensorTracker
    from memplan.terms import Term

    T, H, E, k, I, Is, r = 40, 64, 8, 2, 32, 64, 16  # this file's config: I_moe 32, 2 shared experts
    mlp = _adapted("deepseek_v3", T).get_base_model().model.layers[1].mlp
    x = torch.randn(1, T, H, dtype=torch.float32, requires_grad=True)
    tr = LiveTensorTracker(device="cpu")
    for t in [*mlp.parameters(), *mlp.buffers(), x]:
        tr.register(t, Term.OTHER_PARAMS)
    with tr:
        c0 = tr.clock
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mlp(x)
        c1 = tr.clock
        y.backward(torch.ones_like(y))
        c2 = tr.clock
    kept = sum(rec.nbytes for rec in tr.records if c0 < rec.created <= c1 and rec.alive_at(c1 + 0.1))
    Tk = T * k
    router = 2 * r * H + 2 * E * r + 2 * E * H + 2 * T * H + 4 * T * E + 12 * Tk + 2 * T
    experts = 12 * E * I * H + Tk * (8 * H + 16 * I + 26) + 4 * E + 4 * T * H
    shared = 12 * T * Is + 8 * T * H
    assert kept == router + experts + shared
    bw = [rec for rec in tr.records if c1 + 1 < rec.created <= c2]
    peak = max(sum(rec.nbytes for rec in bw if rec.alive_at(t)) for t in {rec.created for rec in bw})
    assert peak == (8 * E * I * H + 2 * 8 * E * r * H + 16 * E * I * r + 4 * E * H * r + 4 * E * r * I
                    + 4 * Tk * H + 4 * T * H + 2 * Tk)


def test_cuda_emulation_mla_and_experts(monkeypatch):
    """CUDA (emulated, read from torch's sources): MLA's v head dim differs from q/k's, so flash is out
    and mem-efficient attention runs (no S x S math path); the default recipe's fp32 experts refuse
    grouped_mm as the real CUDA kernel would (fix: --no-prepare or eager experts)."""
    from memplan.errors import MemplanError
    from memplan.runtime import tracker as rt_tracker

    seen = []

    class Capturing(rt_tracker.LiveTensorTracker):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self)

    monkeypatch.setattr(rt_tracker, "LiveTensorTracker", Capturing)
    cfg = CONFIGS["deepseek_v3"]
    with pytest.raises(MemplanError, match="bf16 inputs only"):
        simulate(cfg, TrainPlan(device="cuda", seq_len=64, lora_dropout=0.0))
    simulate(cfg, TrainPlan(device="cuda", seq_len=64, lora_dropout=0.0, prepare=False))
    recs = seen[-1].records
    eff = [r for r in recs if r.op == "_scaled_dot_product_efficient_attention.default"]
    assert {(r.shape, r.dtype) for r in eff} >= {((1, 4, 64, 16), "bfloat16")}  # output has v's head dim
    assert not [r for r in recs if r.op in ("_safe_softmax.default", "_scaled_dot_product_flash_attention.default")]


def teardown_module(module):
    if _ROWS:
        print("\nsimulate vs real CPU step (peak live bytes)")
        for name, real, sim in _ROWS:
            print(f"  {name:32s} real {real:>10,d}  sim {sim:>10,d}  diff {sim - real:+d}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider"]))
