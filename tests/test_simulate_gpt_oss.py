"""gpt_oss (attention sinks, alternating sliding/full layers, biased router, fused biased experts with
a clamped SwiGLU): simulate vs a real CPU step, the contract of tests/test_simulate.py (0.1 % of the
peak, every term, every phase peak). Today they agree to the byte.

transformers 5.24 gives gpt_oss no SDPA (`_supports_sdpa = False`: `attn_implementation="sdpa"`
raises ValueError in from_pretrained), so the plans use eager. The experts run transformers 5's
default `grouped_mm` (model.config._experts_implementation == "grouped_mm" on CPU and on meta):
data-independent, no patch needed. Reproduce: `python tests/test_simulate_gpt_oss.py` (prints the
table) or `pytest -q tests/test_simulate_gpt_oss.py`.

MEMORY SHEET: one gpt_oss MoE decoder layer on the default QLoRA recipe
=======================================================================
transformers 5.24 + peft 0.21.2 + bitsandbytes 0.50.2; bf16 load, nf4 + double quant,
prepare_model_for_kbit_training, bf16 autocast, all-linear LoRA r=16, lora_dropout 0, experts
grouped_mm. Measured on a tiny model (H=64, I=40, E=6, k=2, heads 4/2, head_dim 24, T=36) with a
TorchDispatchMode over the block and `torch.autograd.graph.saved_tensors_hooks` (the script's logic
is `_block_sheet` below; `test_moe_block_saved_tensors` asserts its totals). Notation: T tokens, H
hidden, E experts, k top-k, I = I_moe (intermediate_size), r LoRA rank, q_dim = heads*head_dim,
kv_dim = kv_heads*head_dim, nh heads.

Parameters after load + prepare + get_peft_model (per layer):
  4-bit (Params4bit, packed uint8 + quant_state as FACTS.md): q_proj [q_dim, H], k_proj [kv_dim, H],
      v_proj [kv_dim, H], o_proj [H, q_dim]. Nothing else in the layer is an nn.Linear.
  16-bit at load, fp32 after prepare (not Params4bit): q/k/v/o biases [q_dim], [kv_dim] x2, [H]
      (bitsandbytes' Linear4bit.forward then casts each bias to the compute dtype, bf16, on first
      use), self_attn.sinks [nh], mlp.router.weight [E, H], mlp.router.bias [E],
      mlp.experts.gate_up_proj [E, H, 2I] (transposed, gate/up interleaved in the last dim),
      mlp.experts.gate_up_proj_bias [E, 2I], mlp.experts.down_proj [E, I, H],
      mlp.experts.down_proj_bias [E, H], input_layernorm [H], post_attention_layernorm [H].
      => experts 4*E*(3*I*H + 2I + H) B per layer in fp32 (gpt-oss-20b: 2.39 GiB per layer,
      57.3 GiB for 24 layers; gpt-oss-120b: 9.55 GiB per layer): the term that decides the GPU.
  LoRA (fp32, trainable): q A [r, H] B [q_dim, r]; k, v A [r, H] B [kv_dim, r]; o A [r, q_dim]
      B [H, r]. peft 0.21.2's "all-linear" does NOT touch the experts or the router on gpt_oss
      (they are nn.Parameters, and peft's fused-expert name mapping, _MOE_TARGET_MODULE_MAPPING in
      utils/transformers_weight_conversion.py, lists only mixtral and qwen2_moe): no ParamWrapper on
      the default recipe. Adapting experts needs LoraConfig(target_parameters=[
      "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]) -- see "target_parameters" below.

MoE block forward, input x [T, H] fp32 (the residual stream after prepare; the post-attention
RMSNorm returns its input dtype), in order ("saved" = kept for backward, measured):
  router  F.linear under autocast: bias -> bf16 [E] (transient), weight -> bf16 [E, H] (SAVED, 2EH),
          x -> bf16 [T, H] (transient, not saved: the router weight needs no grad),
          logits [T, E] bf16 (transient), topk values [T, k] bf16 (transient),
          topk indices [T, k] int64 (SAVED), softmax over the k [T, k] bf16 (SAVED).
  experts (grouped_mm_experts_forward): sort values [Tk] int64 (transient), perm [Tk] int64 (SAVED),
          perm // k [Tk] int64 (SAVED), gathered states [Tk, H] fp32 (transient), routing weights
          gathered [Tk] bf16 (SAVED), histc input [Tk] fp32 + histc [E] fp32 (transient),
          offsets cumsum [E] int32 (SAVED), gate_up bias gathered [Tk, 2I] fp32 (transient),
          grouped_mm gate_up [Tk, 2I] fp32 (SAVED, clamp's input; bias added in place),
          gate clamp [Tk, I] fp32 (SAVED), up clamp [Tk, I] fp32 (transient), gate*alpha [Tk, I]
          (transient), sigmoid [Tk, I] (SAVED), glu = gate*sigmoid [Tk, I] (SAVED), up + 1 [Tk, I]
          (SAVED), (up+1)*glu [Tk, I] (transient: grouped_mm does not save its input when the
          weight is frozen), down bias gathered [Tk, H] (transient), grouped_mm down [Tk, H] fp32
          (SAVED, bias in place), * routing weight [Tk, H] fp32 (transient), inverse perm [Tk]
          int64 (SAVED; arange [Tk] transient), reorder [Tk, H] fp32 (transient),
          sum over k -> output [T, H] fp32 (the block's output).
  The fp32 expert weights themselves are saved by reference (no copy).
  Saved by the block (beyond its input): 2EH + 8Tk*(... ) exactly
      2EH + 8Tk + 2Tk + 8Tk + 8Tk + 2Tk + 4E + 4Tk*2I + 4*4Tk*I + 4Tk*H + 8Tk   bytes
    = 2EH + 4E + 36Tk + 24TkI + 4TkH          (T=36, k=2, E=6, H=64, I=40: 90,936 B measured)
    (the [T, k] indices/softmax counted as Tk elements: 8Tk + 2Tk.)
  Forward transient peak inside the block: 175,200 B here (the [Tk, H] / [Tk, 2I] gathers).
  Backward of the block (grouped_mm backward w.r.t. its input only, clamp/sigmoid backward,
  index_put into [Tk, H], scatter to x): transient peak 83,376 B measured here, dominated by two
  [Tk, 2I] fp32 buffers (slice_backward of the interleaved gate/up) + [Tk, I] fp32 grads, and
  [Tk, H] fp32 grads of the down projection.

target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] (not the default recipe;
measured the same way): peft wraps the experts twice (ParamWrapper(ParamWrapper(GptOssExperts))):
  LoRA per layer (fp32, trainable): gate_up A [E*r, H] B [2I, E*r]; down A [E*r, I] B [H, E*r].
  Every forward materializes the merged delta W + scale * (B A per expert) as full fp32 tensors,
  TWICE per forward (baddbmm [E, I, H] and [E, H, 2I] once transient, then again for the call):
  the second pair is SAVED: 4*E*3*I*H B per layer (= the expert weights' size again; gpt-oss-20b
  2.37 GiB per layer), plus the LoRA factors reshaped per expert (E, I, r), (E, r, H), (E, H, r),
  (E, r, 2I) fp32 SAVED, plus the gathered states [Tk, H] fp32 and (up+1)*glu [Tk, I] fp32 SAVED
  (the weights now need grads). Block saved bytes measured 305,208 here vs 90,936 without.
  Backward adds [E, H, 2I] + [E, I, H] fp32 weight grads of the merged tensors (transient peak
  354,960 B here). Without gradient checkpointing this is 24 x 2.37 GiB for gpt-oss-20b.
"""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.model import model_from_config  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.runtime.step import cpu_step  # noqa: E402
from memplan.simulate import simulate  # noqa: E402

TOL = 1e-3  # DESIGN.md: simulate vs a real CPU step within 0.1 % of peak live bytes

# two layers: layer 0 sliding (window 8 < seq 32), layer 1 full, as the hub configs alternate
CONFIG = dict(model_type="gpt_oss", hidden_size=64, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=500, num_hidden_layers=2, num_local_experts=4,
              num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
              max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# the default QLoRA recipe (paged_adamw_8bit, bf16 autocast, prepare, all-linear r=16) with
# lora_dropout 0 and eager attention (the only kernel transformers 5.24 builds gpt_oss with on CPU)
PLANS = {
    "default-gc": dict(seq_len=32, lora_dropout=0.0, attn_implementation="eager"),
    "default-nogc": dict(seq_len=32, lora_dropout=0.0, attn_implementation="eager", gradient_checkpointing=False),
}
_ROWS: list[tuple[str, int, int]] = []


def _assert_close(real, sim) -> None:
    peak = real.peak_bytes
    assert abs(sim.peak_bytes - peak) <= TOL * peak, (real.peak_bytes, sim.peak_bytes)
    assert sim.peak_phase == real.peak_phase
    for term, b in real.terms.items():
        assert abs(sim.terms[term] - b) <= TOL * peak, (term, b, sim.terms[term])
    assert set(sim.phase_peaks) == set(real.phase_peaks)
    for phase, b in real.phase_peaks.items():
        assert abs(sim.phase_peaks[phase] - b) <= TOL * peak, (phase, b, sim.phase_peaks[phase])


@pytest.mark.parametrize("plan_id", list(PLANS))
def test_simulate_matches_cpu_step(plan_id):
    plan = TrainPlan(device="cpu", **PLANS[plan_id])
    real = cpu_step(CONFIG, plan)
    sim = simulate(CONFIG, plan)
    _ROWS.append((f"gpt_oss-{plan_id}", real.peak_bytes, sim.peak_bytes))
    _assert_close(real, sim)


def test_sdpa_is_refused_as_transformers_refuses_it():
    """transformers 5.24: GptOssPreTrainedModel._supports_sdpa = False; an explicit sdpa raises."""
    from memplan.simulate.driver import StepWouldFail

    with pytest.raises(StepWouldFail, match="scaled_dot_product_attention"):
        simulate(CONFIG, TrainPlan(device="cpu", seq_len=32, lora_dropout=0.0))


def test_inventory_of_the_tiny_model():
    """ModelSpec's inventory equals the real model's parameters (the catalogue test does it at size)."""
    from memplan.runtime.load import hf_config
    from transformers import AutoModelForCausalLM

    spec = model_from_config(CONFIG)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(CONFIG))
    assert sum(p.numel() for p in model.parameters()) == spec.params
    assert model.config._experts_implementation == "grouped_mm"
    assert spec.attention_types == ("full_attention", "sliding_attention") and spec.sliding_window == 8
    assert [lin.name for lin in spec.layer_linears] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                       "self_attn.o_proj"]
    assert all(lin.bias for lin in spec.layer_linears)


def _block_sheet(model, T: int, H: int):
    """Saved-for-backward bytes (beyond the input) and forward/backward transient peaks of layer 0's
    MoE block, under bf16 autocast, measured with a dispatch mode and saved_tensors_hooks."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.cur, self.peak = {}, 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    key = st.data_ptr()
                    if key in self.live or key in params or st.nbytes() == 0:
                        continue
                    self.live[key] = st.nbytes()
                    self.cur += st.nbytes()
                    self.peak = max(self.peak, self.cur)
                    weakref.finalize(st, self._free, key)
            return out

        def _free(self, key):
            self.cur -= self.live.pop(key, 0)

    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and key != x.untyped_storage().data_ptr():
            saved[key] = t.untyped_storage().nbytes()
        return t

    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(1, T, H, requires_grad=True)
    fwd = Live()
    with torch.autocast("cpu", dtype=torch.bfloat16), fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = mlp(x)
    bwd = Live()
    with bwd:
        out.backward(torch.ones_like(out))
    return sum(saved.values()), fwd.peak, bwd.peak


def test_moe_block_saved_tensors():
    """The memory sheet's formula for what one MoE block saves (default recipe: experts frozen)."""
    from memplan.runtime.load import adapt, load_model

    H, I, E, k, T = 64, 40, 6, 2, 36
    cfg = dict(CONFIG, hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k, head_dim=24)
    plan = TrainPlan(device="cpu", seq_len=T, lora_dropout=0.0, attn_implementation="eager",
                     gradient_checkpointing=False)
    model = adapt(load_model(cfg, plan), plan)
    names = {n for n, _ in model.named_parameters() if ".layers.0.mlp." in n}
    assert not any("lora" in n for n in names)  # all-linear leaves the experts and router alone
    saved, fwd_peak, bwd_peak = _block_sheet(model, T, H)
    Tk = T * k
    assert saved == 2 * E * H + 4 * E + 36 * Tk + 24 * Tk * I + 4 * Tk * H == 90_936
    assert (fwd_peak, bwd_peak) == (175_200, 83_376)


if __name__ == "__main__":  # pragma: no cover
    for pid in PLANS:
        test_simulate_matches_cpu_step(pid)
    for name, real, sim in _ROWS:
        print(f"{name:24s} real {real:>10,d} B  simulate {sim:>10,d} B  diff {sim - real:+d}")
    sys.exit(0)
