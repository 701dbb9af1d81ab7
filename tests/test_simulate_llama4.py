"""Llama 4 (llama4_text and the multimodal llama4 wrapper): simulate vs a real CPU step, and the
measured memory sheet of one MoE decoder layer (transformers 5.24, peft 0.21.2, bitsandbytes 0.50.2).

Recipe. peft's ``all-linear`` cannot train Llama 4: it wraps ``feed_forward.router`` (Llama4Router
subclasses nn.Linear and returns a tuple) and the step fails in peft's forward with
``AttributeError: 'tuple' object has no attribute 'dtype'`` (tested below, real and simulated). The
recipe that runs is all-linear minus the router: ``target_modules=[q,k,v,o,gate,up,down]_proj`` (the
attention, the shared expert and the dense MLP Linears), optionally plus
``target_parameters=["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]`` (peft
ParamWrapper on the fused experts; TrainPlan has no field for it yet). All-linear does NOT wrap the
experts on Llama 4 (peft's v4->v5 MoE conversion covers mixtral & co, not llama4), and Llama 4's experts
do not use transformers' experts interface: no ``grouped_mm``, no eager loop, no routing dependence.

MEMORY SHEET, one MoE layer (Llama4TextMoe), QLoRA nf4 + double quant, prepare_model_for_kbit_training,
bf16 autocast, LoRA r, dropout 0. T tokens (B*S), H hidden, E experts, k top-k, I expert intermediate
(= shared expert intermediate = `intermediate_size`), r rank. Measured on CPU by `_sheet` below
(saved_tensors_hooks + a dispatch log; H=64, I=48, E=4, T=40, r=16, k=1 and 2).

Parameters after prepare + peft:
- experts.gate_up_proj [E, H, 2I], experts.down_proj [E, I, H]: nn.Parameter, 16-bit at load, upcast to
  fp32 by prepare (4 B each; frozen). NOT 4-bit (bitsandbytes replaces `type(m) is nn.Linear` only).
- router.weight [E, H]: Llama4Router (nn.Linear subclass, so not quantized); fp32 after prepare, frozen.
- shared_expert.{gate,up}_proj [I, H], down_proj [H, I]: Params4bit (packed uint8 [I*H/2, 1] + quant state
  as any 4-bit Linear), LoRA A [r, in] / B [out, r] fp32 trainable.
- with target_parameters (ParamWrapper; peft reads a 3-D param as [E, out, in], so for Llama 4's [E, H, 2I]
  "out" = H and "in" = 2I): gate_up_proj lora_A [r*E, 2I], lora_B [H, r*E]; down_proj lora_A [r*E, H],
  lora_B [I, r*E]; fp32 trainable. Per forward each wrapper materializes W + B@A as a NEW fp32 tensor of
  the full expert shape (baddbmm [E, H, 2I] / [E, I, H]), then autocast copies it to bf16 for the bmm.

Forward of Llama4TextMoe, in order (x: the fp32 [T, H] post-attention-norm output; S = saved for backward):
  router: x->bf16 [T,H]; W_router->bf16 [E,H] (S); logits bf16 [T,E]; topk values bf16 [T,k], indices int64
  [T,k] (S); full_like/scatter bf16 [T,E]; ->fp32 [T,E]; sigmoid fp32 [T,E] (S); ->bf16 [T,E] (scores)
  routed_in = x.repeat(E, 1): fp32 [E*T, H] (S); scores.T.reshape(-1,1): bf16 [E*T, 1] (S);
  routed_in * scores: fp32 [E*T, H]; experts: ->bf16 [E,T,H] (S only with ParamWrapper);
  gate_up_proj->bf16 [E,H,2I] (S); bmm bf16 [E,T,2I] (S); silu(gate) bf16 [E,T,I] (S); up*silu bf16 [E,T,I]
  (S only with ParamWrapper); down_proj->bf16 [E,I,H] (S); bmm bf16 [E,T,H]; shared expert (a QLoRA
  Llama MLP under autocast); out.add_(routed.view(E,T,H).sum(0)).
Every expert runs on all T tokens (dense, data-independent): the scores are 0 outside the top k.
Saved bytes per MoE block (measured = formula, asserted below):
  routed   = 2EH + 8Tk + 6TE + 4ETH + 6ETI + 6EHI        (+ 2ETH + 2ETI with ParamWrapper experts)
  shared   = 4TH + 14TI + 6Tr + 6r(H + I)
  (6EHI: the bf16 copies autocast makes every forward of the experts prepare upcast to fp32 -- 4.0 GB
  per layer for Scout, E=16, H=5120, I=8192, whatever T; under checkpointing one layer's set is alive
  again during its backward. Without prepare the experts and the router stay bf16 and autocast saves
  them as they are: routed = 8Tk + 6TE + 4ETH + 6ETI, measured with the same fp32 input.)
Backward of the block (the shared expert's runs first, it was computed last), routed part in order,
  measured allocations (autograd frees each node's saved tensors once the node has run):
  1 grad of the sum over experts: bf16 [E,T,H] (2ETH)
  2 down bmm: grad_in bf16 [E,T,I] (2ETI); then the down_proj bf16 copy (2EHI) is freed
  3 up*silu: two bf16 [E,T,I]; silu_backward bf16 [E,T,I]; cat bf16 [E,T,2I] (4ETI); the saved
    gate_up output (4ETI) and silu (2ETI) freed
  4 gate_up bmm: grad_in bf16 [E,T,H] (2ETH); the gate_up_proj bf16 copy (4EHI) freed
  5 autocast cast backward: fp32 [E,T,H] (4ETH)
  6 routed_in * scores: grad_in fp32 [E*T,H] (4ETH) and grad*routed_in fp32 [E*T,H] (4ETH) summed to
    fp32 [E*T,1] -> bf16; the saved fp32 routed_in (4ETH) freed: 12ETH new at most here
  7 repeat backward: sum over E -> fp32 [T,H]; router: sigmoid_backward fp32 [T,E], gather/scatter
    bf16 [T,E], mm -> bf16 [T,H] -> fp32 [T,H]
  With ParamWrapper experts, 2 and 4 also make the merged weights' grads (bf16, then fp32 [E,I,H] and
  [E,H,2I]: 4EIH and 8EHI B) before baddbmm's backward into the LoRA grads ([E,r,.] pieces).
  Which window is the block's peak depends on the sizes: at Scout's sizes the 6EHI expert copies
  dominate, so it is at steps 1-4 (while they are alive); on the tiny model (H=64) measured with the
  tracker it is the shared expert's backward, +43,268 B over what was live when the block's backward
  began (parameters + saved set; +59,140 B with ParamWrapper, k=2). The whole-step simulate matches
  the real step to the byte (test below), so phase 2 can check its walk against simulate at any size.
On CUDA the only difference expected is autocast (CPU autocast also runs the LoRA input cast, FACTS.md)
and 512 B rounding; nothing here is CPU-only.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.plan import TrainPlan  # noqa: E402
from memplan.runtime.step import cpu_step  # noqa: E402
from memplan.simulate import simulate  # noqa: E402
from sim_checks import assert_simulate_matches  # noqa: E402


#: all-linear minus Llama4Router (see the module doc)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_PARAMS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]

# 3 layers covering every kind: 0 dense + RoPE + chunked, 1 MoE + NoPE (temperature tuning) + full,
# 2 MoE + RoPE (L2 qk norm) + chunked; chunk 32 < seq 64 so the chunked mask matters
_TEXT = dict(model_type="llama4_text", hidden_size=64, intermediate_size=48, intermediate_size_mlp=96,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=384, num_hidden_layers=3,
             num_local_experts=4, num_experts_per_tok=1, moe_layers=[1, 2], no_rope_layers=[1, 0, 1],
             attention_chunk_size=32, floor_scale=16, max_position_embeddings=1024, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama4_text": _TEXT,
    # the hub checkpoints' Llama4Config; AutoModelForCausalLM (memplan's loader) builds Llama4ForCausalLM
    # from its text_config: the vision tower is not built on this path
    "llama4-multimodal": dict(
        model_type="llama4", architectures=["Llama4ForConditionalGeneration"],
        text_config=dict(_TEXT, num_local_experts=8, num_experts_per_tok=2),
        vision_config=dict(model_type="llama4_vision_model", hidden_size=32, intermediate_size=64,
                           num_attention_heads=2, num_hidden_layers=1, image_size=56, patch_size=14,
                           vision_output_dim=48, projector_input_dim=40, projector_output_dim=40)),
}
PLANS = {"gc": dict(gradient_checkpointing=True), "nogc": dict(gradient_checkpointing=False)}


def _plan(plan_id: str) -> TrainPlan:
    return TrainPlan(device="cpu", seq_len=64, lora_dropout=0.0, target_modules=TARGETS, **PLANS[plan_id])


@pytest.mark.parametrize("cfg_id", list(CONFIGS))
@pytest.mark.parametrize("plan_id", list(PLANS))
def test_simulate_matches_cpu_step(cfg_id, plan_id):
    """Measured: byte-identical peak, terms and phase peaks (llama4_text 1,762,480 B with checkpointing,
    2,515,120 B without; the multimodal wrapper 2,407,088 / 3,243,184 B)."""
    cfg, plan = CONFIGS[cfg_id], _plan(plan_id)
    real = cpu_step(cfg, plan)
    sim = simulate(cfg, plan)
    assert any(n.startswith("Llama 4 experts: every expert runs on all T tokens") for n in sim.notes)
    assert_simulate_matches(real, sim)


def test_all_linear_is_refused_by_the_real_stack_and_by_simulate():
    """peft's all-linear wraps Llama4Router (an nn.Linear subclass returning a tuple)."""
    from memplan.errors import MemplanError

    plan = TrainPlan(device="cpu", seq_len=32, lora_dropout=0.0)
    with pytest.raises(AttributeError, match="'tuple' object has no attribute 'dtype'"):
        cpu_step(CONFIGS["llama4_text"], plan, steps=1)
    with pytest.raises(MemplanError, match=r"\(AttributeError from peft\): 'tuple' object has no attribute"):
        simulate(CONFIGS["llama4_text"], plan)


# ---- the memory sheet of one MoE block, measured ---------------------------------------------------
H, I, E, T, R = 64, 48, 4, 40, 16


def _sheet(k: int, expert_lora: bool, prepare: bool = True):
    """Build a 1-layer MoE model the QLoRA way, run its MoE block under bf16 autocast and return
    (block, bytes of the non-parameter storages autograd saved in forward)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from memplan.runtime.load import load_model

    cfg = dict(_TEXT, num_hidden_layers=1, moe_layers=[0], no_rope_layers=[1], num_local_experts=E,
               num_experts_per_tok=k, intermediate_size=I, hidden_size=H)
    model = load_model(cfg, TrainPlan(device="cpu", seq_len=T))
    if prepare:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    extra = dict(target_parameters=EXPERT_PARAMS) if expert_lora else {}
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS),
                                             task_type="CAUSAL_LM", **extra))
    block = model.base_model.model.model.layers[0].feed_forward
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, T, H, requires_grad=True)  # fp32: the residual stream after prepare
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = block(x)
    out.float().sum().backward()  # and the block's backward runs
    return block, sum(saved.values())


def test_moe_block_memory_sheet_without_prepare():
    _, saved = _sheet(1, False, prepare=False)  # bf16 experts and router: autocast copies neither
    k = 1
    routed = 8 * T * k + 6 * T * E + 4 * E * T * H + 6 * E * T * I
    assert saved == routed + 4 * T * H + 14 * T * I + 6 * T * R + 6 * R * (H + I)  # measured: 140,032 B


@pytest.mark.parametrize("k,expert_lora", [(1, False), (2, True)])
def test_moe_block_memory_sheet(k, expert_lora):
    block, saved = _sheet(k, expert_lora)
    p = dict(block.named_parameters())
    ex = "experts.base_layer.base_layer." if expert_lora else "experts."
    # experts and router: 16-bit at load, fp32 after prepare, never 4-bit
    assert (p[ex + "gate_up_proj"].shape, p[ex + "gate_up_proj"].dtype) == ((E, H, 2 * I), torch.float32)
    assert (p[ex + "down_proj"].shape, p[ex + "down_proj"].dtype) == ((E, I, H), torch.float32)
    assert (p["router.weight"].shape, p["router.weight"].dtype) == ((E, H), torch.float32)
    assert type(p["shared_expert.gate_proj.base_layer.weight"]).__name__ == "Params4bit"
    if expert_lora:  # ParamWrapper: peft reads [E, H, 2I] as [E, out=H, in=2I]
        assert p["experts.base_layer.lora_A.default.weight"].shape == (R * E, 2 * I)
        assert p["experts.base_layer.lora_B.default.weight"].shape == (H, R * E)
        assert p["experts.lora_A.default.weight"].shape == (R * E, H)
        assert p["experts.lora_B.default.weight"].shape == (I, R * E)
    routed = 2 * E * H + 8 * T * k + 6 * T * E + 4 * E * T * H + 6 * E * T * I + 6 * E * H * I
    if expert_lora:
        routed += 2 * E * T * H + 2 * E * T * I
    shared = 4 * T * H + 14 * T * I + 6 * T * R + 6 * R * (H + I)
    assert saved == routed + shared  # measured: 214,272 B (k=1) and 250,432 B (k=2, ParamWrapper)


def test_multimodal_vision_tower_is_4bit_and_adapted_by_all_linear():
    """Loaded as the hub checkpoints are (AutoModelForImageTextToText + BitsAndBytesConfig): every
    vision/projector nn.Linear becomes Linear4bit, prepare upcasts the rest of the tower to fp32, and
    peft's all-linear targets them all (and the routers). memplan's own loader (AutoModelForCausalLM)
    builds the text model only: the tower's weights (`ModelSpec.unloaded_vision_params`) are dropped."""
    import tempfile

    from peft import prepare_model_for_kbit_training
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from transformers import AutoModelForImageTextToText

    from memplan.model import model_from_config
    from memplan.runtime.load import bnb_config, hf_config

    cfg = CONFIGS["llama4-multimodal"]
    spec = model_from_config(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        full = AutoModelForImageTextToText.from_config(hf_config(cfg), dtype=torch.bfloat16)
        assert sum(p.numel() for n, p in full.named_parameters()
                   if not n.startswith("language_model")) == spec.unloaded_vision_params
        full.save_pretrained(tmp)
        model = AutoModelForImageTextToText.from_pretrained(
            tmp, dtype=torch.bfloat16, quantization_config=bnb_config(TrainPlan(device="cpu")))
    tower = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and not n.startswith("language_model")}
    assert {type(m).__name__ for m in tower.values()} == {"Linear4bit"}
    assert spec.vision_params == 0 and spec.unloaded_vision_params > 0
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("language_model")
            and type(p).__name__ != "Params4bit"} == {torch.float32}  # biases, norms, embeddings
    from peft import LoraConfig

    targets = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), model).target_modules
    assert set(tower) <= set(targets)
    assert {t for t in targets if t.endswith("router")} == {"language_model.model.layers.1.feed_forward.router",
                                                          "language_model.model.layers.2.feed_forward.router"}
