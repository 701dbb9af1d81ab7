"""simulate (meta-device trace of a training step) against real CPU steps, and its CUDA emulation.

The contract (DESIGN.md): simulate(plan with device="cpu") equals a real CPU step of the same
config within 0.1 % of peak live bytes. Today they agree to the byte (peak, every term, every phase
peak); the assertions allow the contract's 0.1 %. The table is printed at the end of the run and by
`python tests/test_simulate.py`.
"""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.errors import MissingExtraError  # noqa: E402
from memplan.plan import TrainPlan  # noqa: E402
from memplan.runtime import tracker as rt_tracker  # noqa: E402
from memplan.runtime.step import cpu_step  # noqa: E402
from memplan.simulate import driver as sim_driver  # noqa: E402
from memplan.simulate import moe as sim_moe  # noqa: E402
from memplan.simulate import simulate  # noqa: E402
from sim_checks import assert_simulate_matches  # noqa: E402


_COMMON = dict(num_hidden_layers=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=False),
    "mistral-gqa": dict(model_type="mistral", hidden_size=128, intermediate_size=256, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=1200, sliding_window=None),
    "qwen2-qkv-bias": dict(model_type="qwen2", hidden_size=128, intermediate_size=320, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1500, tie_word_embeddings=False),
    "gemma-tied": dict(model_type="gemma", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=32, vocab_size=3000),
    # transformers has no SDPA for gemma2 (softcapping): the eager attention path
    "gemma2-tied-eager": dict(model_type="gemma2", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, vocab_size=2000, sliding_window=64),
    "phi3-fused": dict(model_type="phi3", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=1100),
    "mixtral-moe": dict(model_type="mixtral", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1000, num_local_experts=4, num_experts_per_tok=2),
}
for _c in CONFIGS.values():
    for _k, _v in _COMMON.items():
        _c.setdefault(_k, _v)

# id -> plan fields (device="cpu" added); together they cover checkpointing on/off, lora_dropout 0 and
# 0.05, prepare on/off, bf16 autocast vs none, and the optimizers adamw_torch, paged_adamw_8bit,
# adamw_torch_fused and sgd
PLANS = {
    "gc-autocast-paged8bit-drop.05": dict(seq_len=128, optim="paged_adamw_8bit", lora_dropout=0.05),
    "nogc-fp32-adamw-drop0": dict(seq_len=128, optim="adamw_torch", lora_dropout=0.0, gradient_checkpointing=False,
                                  mixed_precision="no"),
    "nogc-autocast-adamw-drop.05": dict(seq_len=96, optim="adamw_torch", lora_dropout=0.05,
                                        gradient_checkpointing=False),
    "noprepare-nogc-fused-drop.05": dict(seq_len=96, optim="adamw_torch_fused", lora_dropout=0.05,
                                         gradient_checkpointing=False, prepare=False),
    "noprepare-gc-fp32-sgd-drop0": dict(seq_len=64, optim="sgd", lora_dropout=0.0, mixed_precision="no",
                                        prepare=False),
    # the recipes of issue 9: padded batches, reentrant checkpointing, 16-bit adapters, eager attention
    "padded-gc": dict(seq_len=128, padding="longest"),
    "reentrant-gc-drop0": dict(seq_len=128, use_reentrant=True, lora_dropout=0.0, optim="adamw_torch"),
    "bf16-adapters-nogc": dict(seq_len=96, adapter_dtype="bf16", gradient_checkpointing=False),
    "eager-padded-reentrant": dict(seq_len=128, attn_implementation="eager", padding="max_length",
                                   use_reentrant=True, lora_dropout=0.0),
}


def _plan(cfg_id: str, plan_id: str, **over) -> TrainPlan:
    fields = dict(PLANS[plan_id], device="cpu", **over)
    if cfg_id.startswith("gemma2"):
        fields["attn_implementation"] = "eager"
    if cfg_id.startswith("mixtral"):
        fields["lora_dropout"] = 0.0  # peft: LoRA on the fused expert tensors (ParamWrapper) needs dropout 0
    return TrainPlan(**fields)


# every plan on llama; three per other architecture (each plan on >= 3 architectures), to keep the
# real CPU steps (the slow half) within the suite's time budget
_P = list(PLANS)
MATRIX = {
    "llama": _P,
    "mistral-gqa": [_P[0], _P[1], _P[4], _P[5], _P[8]],
    "qwen2-qkv-bias": [_P[0], _P[2], _P[3], _P[6]],
    "gemma-tied": [_P[1], _P[2], _P[4], _P[7]],
    "gemma2-tied-eager": [_P[0], _P[1], _P[3], _P[6]],
    "phi3-fused": [_P[0], _P[2], _P[4], _P[5]],
    "mixtral-moe": [_P[0], _P[1], _P[3]],
}
CASES = [pytest.param(c, p, id=f"{c}-{p}") for c, plans in MATRIX.items() for p in plans]
_ROWS: list[tuple[str, int, int]] = []




@pytest.mark.parametrize("cfg_id,plan_id", CASES)
def test_simulate_matches_cpu_step(cfg_id, plan_id):
    cfg, plan = CONFIGS[cfg_id], _plan(cfg_id, plan_id)
    real = cpu_step(cfg, plan)
    sim = simulate(cfg, plan)
    _ROWS.append((f"{cfg_id}-{plan_id}", real.peak_bytes, sim.peak_bytes))
    assert_simulate_matches(real, sim)


def _balanced_router(monkeypatch):
    """Make the real CPU step route like the simulation: slot j of token t -> expert (t*k + j) mod E."""
    from transformers.models.mixtral import modeling_mixtral as mm

    orig = mm.MixtralTopKRouter.forward

    def forward(self, hidden_states):
        logits, scores, idx = orig(self, hidden_states)
        if not idx.is_meta:
            n, k = idx.shape
            idx = (torch.arange(n * k) % self.num_experts).view(n, k).to(idx.device)
        return logits, scores, idx

    monkeypatch.setattr(mm.MixtralTopKRouter, "forward", forward)


@pytest.mark.parametrize("plan_id", ["gc-autocast-paged8bit-drop.05"])
def test_moe_eager_loop_balanced_routing(plan_id, monkeypatch):
    """experts_implementation="eager": simulate routes evenly; the real step then differs a little
    (its routing is not balanced), and equals it once the same routing is imposed on it."""
    cfg = dict(CONFIGS["mixtral-moe"], experts_implementation="eager")
    plan = _plan("mixtral-moe", plan_id)
    sim = simulate(cfg, plan)
    real = cpu_step(cfg, plan)
    assert abs(sim.peak_bytes - real.peak_bytes) <= 0.02 * real.peak_bytes
    _balanced_router(monkeypatch)
    assert_simulate_matches(cpu_step(cfg, plan), sim)
    assert sim_moe.balanced_counts(5, 2, 4) == [3, 3, 2, 2]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("cfg_id,plan_id", [("llama", "gc-autocast-paged8bit-drop.05"),
                                            ("mixtral-moe", "noprepare-nogc-fused-drop.05"),
                                            ("mistral-gqa", "nogc-autocast-adamw-drop.05")])
def test_fast_warmup_equals_full_warmup(cfg_id, plan_id, device):
    plan = _plan(cfg_id, plan_id).replace(device=device)
    fast = simulate(CONFIGS[cfg_id], plan)
    full = simulate(CONFIGS[cfg_id], plan, full_warmup=True)
    assert (fast.peak_bytes, fast.terms, fast.phase_peaks, fast.paged_bytes) == \
           (full.peak_bytes, full.terms, full.phase_peaks, full.paged_bytes)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("cfg_id", ["llama", "gemma-tied", "mixtral-moe"])
def test_fast_meta_kernels_agree_with_torch(cfg_id, device, monkeypatch):
    """The tracker's shortcut meta kernels give what torch's own meta kernels give."""
    monkeypatch.setattr(rt_tracker.LiveTensorTracker, "check_fast", True)
    plan = _plan(cfg_id, "nogc-autocast-adamw-drop.05").replace(device=device)
    if device == "cuda" and cfg_id.startswith("mixtral"):
        plan = plan.replace(prepare=False)  # CUDA grouped_mm: bf16 experts only
    simulate(CONFIGS[cfg_id], plan, full_warmup=True)


# ---- CUDA emulation --------------------------------------------------------------------------------
@pytest.fixture
def capture(monkeypatch):
    """The tracker simulate used (its per-storage records)."""
    cls = rt_tracker.LiveTensorTracker
    seen = []

    class Capturing(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self)

    monkeypatch.setattr(rt_tracker, "LiveTensorTracker", Capturing)
    return seen


def _records(trackers, **match):
    return [r for r in trackers[-1].records if all(getattr(r, k) == v for k, v in match.items())]


def test_cuda_emulation_kernels(capture):
    cfg = dict(CONFIGS["mistral-gqa"])  # GQA: 8 query heads, 2 key/value heads, head_dim 16
    plan = TrainPlan(device="cuda", seq_len=2048, optim="adamw_torch", lora_dropout=0.05,
                     gradient_checkpointing=False)
    res = simulate(cfg, plan)
    recs = capture[-1].records
    assert res.peak_bytes > 0 and all(r.nbytes % 512 == 0 for r in recs)  # caching-allocator rounding
    # flash attention saves out + fp32 logsumexp [B, H, S] (+ rng state), GQA without expanding k/v
    flash = [r for r in recs if r.op == "_scaled_dot_product_flash_attention.default"]
    assert {(r.shape, r.dtype) for r in flash} >= {((1, 8, 2048, 16), "bfloat16"), ((1, 8, 2048), "float32")}
    assert not [r for r in recs if r.op == "_safe_softmax.default"]  # no S x S math path
    # flash backward workspaces: dq_accum fp32 [B, S128, H, D32] and expanded dk/dv for GQA
    assert [r for r in recs if r.shape == (1, 2048, 8, 32) and r.dtype == "float32"]
    assert len([r for r in recs if r.shape == (1, 2048, 8, 16) and r.dtype == "bfloat16"
                and r.phase == "backward" and (not r.op or r.op.startswith("temp:"))]) >= 2
    # fused dropout: bool masks, no full-dtype noise
    assert [r for r in recs if r.op == "native_dropout.default" and r.dtype == "bool"]
    assert not [r for r in recs if r.op == "bernoulli_.float"]
    # autocast on CUDA: peft does not copy the LoRA input to fp32 (CPU autocast does)
    q_in = [r for r in recs if r.module.endswith("layers.0.self_attn.q_proj") and r.op == "_to_copy.default"
            and r.dtype == "float32" and r.phase == "forward"]
    assert not q_in
    # > 1536 tokens: gemm_4bit dequantizes the weight (bf16 [out, in]) and calls F.linear
    assert [r for r in recs if r.shape == (256, 128) and r.dtype == "bfloat16" and r.phase == "forward"]


def test_cuda_gemm_4bit_fused_for_few_tokens(capture):
    plan = TrainPlan(device="cuda", seq_len=512, optim="adamw_torch", gradient_checkpointing=False)
    simulate(CONFIGS["mistral-gqa"], plan)
    recs = capture[-1].records
    # the fused kernel: no dequantized weight in forward (backward always dequantizes)
    assert not [r for r in recs if r.shape == (256, 128) and r.dtype == "bfloat16" and r.phase == "forward"]


def test_cuda_paged_optimizer_state_is_outside_the_peak():
    cfg = dict(CONFIGS["llama"], hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
               num_key_value_heads=8, num_hidden_layers=1)
    plan = TrainPlan(device="cuda", seq_len=64, lora_r=128, optim="paged_adamw_8bit")
    cuda = simulate(cfg, plan)
    cpu = simulate(cfg, plan.replace(device="cpu"))
    # LoRA B of down_proj etc. has >= 100k elements: paged on CUDA, ordinary memory on CPU
    assert cuda.paged_bytes > 0 and cpu.paged_bytes == 0
    assert cuda.terms["optimizer_state"] + cuda.paged_bytes >= cpu.terms["optimizer_state"]


def test_cuda_grouped_mm_fp32_experts_raise_like_cuda():
    plan = TrainPlan(device="cuda", seq_len=64, lora_dropout=0.0)  # prepare upcasts the experts to fp32
    from memplan.errors import MemplanError

    with pytest.raises(MemplanError, match="bf16 inputs only"):  # a one-line error for the CLI, exit 2
        simulate(CONFIGS["mixtral-moe"], plan)


# ---- housekeeping ----------------------------------------------------------------------------------
def test_patches_are_restored():
    import gc

    import bitsandbytes.functional as bf
    import torch.optim.optimizer as topt
    import transformers.masking_utils as mu
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    before = (mu.find_packed_sequence_indices, torch.autocast, torch.amp.autocast, torch.is_autocast_enabled,
              torch.get_rng_state, torch.random.get_rng_state, torch.random.fork_rng,
              torch.clear_autocast_cache, torch.nn.functional.scaled_dot_product_attention,
              topt._get_fused_kernels_supported_devices, ALL_EXPERTS_FUNCTIONS.get_interface, gc.isenabled())
    simulate(CONFIGS["llama"], _plan("llama", "gc-autocast-paged8bit-drop.05").replace(device="cuda"))
    after = (mu.find_packed_sequence_indices, torch.autocast, torch.amp.autocast, torch.is_autocast_enabled,
              torch.get_rng_state, torch.random.get_rng_state, torch.random.fork_rng,
             torch.clear_autocast_cache, torch.nn.functional.scaled_dot_product_attention,
             topt._get_fused_kernels_supported_devices, ALL_EXPERTS_FUNCTIONS.get_interface, gc.isenabled())
    assert before == after
    assert not bf.name2qmap["dynamic"].is_meta
    assert torch._C._len_torch_function_stack() == 0
    assert "meta" not in topt._get_fused_kernels_supported_devices()


@pytest.mark.parametrize("cfg_id,over,match", [
    ("llama", dict(target_modules=("nonexistent_proj",)), r"\(NoMatchingPeftModuleError from peft\): Target modules"),
    ("mixtral-moe", dict(lora_dropout=0.05), r"\(ValueError from peft\): lora.ParamWrapper does not work"),
])
def test_hf_stack_refusal_is_a_one_line_error(cfg_id, over, match):
    """What peft/transformers/torch refuse becomes StepWouldFail (a MemplanError: one line, exit 2)."""
    from memplan.errors import MemplanError

    with pytest.raises(MemplanError, match=match) as e:
        simulate(CONFIGS[cfg_id], TrainPlan(device="cpu", seq_len=32, **over))
    assert type(e.value).__name__ == "StepWouldFail" and "\n" not in str(e.value)


def test_memplan_bugs_are_not_called_hf_refusals(monkeypatch):
    """An exception raised by memplan's own code (or anything outside the HF stack) propagates unchanged."""
    from memplan.errors import MemplanError
    from memplan.simulate import build, emulation
    from memplan.units import round_up

    def broken_sdpa(self, *args, **kwargs):
        raise ValueError("a bug in the SDPA emulation")

    plan = TrainPlan(device="cpu", seq_len=32)
    with monkeypatch.context() as m:
        m.setattr(emulation.MetaEmulation, "sdpa", broken_sdpa)  # called from torch, inside transformers' forward
        with pytest.raises(ValueError, match="a bug in the SDPA emulation") as e:
            simulate(CONFIGS["llama"], plan)
        assert not isinstance(e.value, MemplanError)
    with monkeypatch.context() as m:
        m.setattr(build, "quantize_on_meta", round_up)  # raises TypeError inside memplan/units.py
        with pytest.raises(TypeError) as e:
            simulate(CONFIGS["llama"], plan)
        assert not isinstance(e.value, MemplanError)
    assert simulate(CONFIGS["llama"], plan).peak_bytes > 0  # and the patches were restored


def test_missing_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(MissingExtraError) as e:
        simulate(CONFIGS["llama"], TrainPlan(device="cpu"))
    assert str(e.value) == ("simulate needs torch, transformers, peft and bitsandbytes: "
                            "pip install 'memplan[sim]'")


def test_progress_lines(capsys):
    p = sim_driver.Progress(True, after=0.0)
    p("building model")
    assert capsys.readouterr().err == "memplan: building model…\n"
    quiet = sim_driver.Progress(True, after=60.0)
    quiet("step 1/2")
    assert capsys.readouterr().err == ""


def test_table(capsys):
    """Print the simulate-vs-CPU table of this run."""
    if not _ROWS:
        pytest.skip("no comparison ran")
    with capsys.disabled():
        print("\n" + _table(_ROWS))


def _table(rows) -> str:
    lines = [f"{'config-plan':58s} {'cpu_step B':>12s} {'simulate B':>12s} {'diff %':>8s}"]
    for name, a, b in rows:
        lines.append(f"{name:58s} {a:12d} {b:12d} {100 * (b - a) / a:8.4f}")
    return "\n".join(lines)


if __name__ == "__main__":  # regenerate the table
    import warnings

    warnings.simplefilter("ignore")
    rows = []
    for c, plans in MATRIX.items():
        for p in plans:
            plan = _plan(c, p)
            rows.append((f"{c}-{p}", cpu_step(CONFIGS[c], plan).peak_bytes, simulate(CONFIGS[c], plan).peak_bytes))
    print(_table(rows))
    sys.exit(0)
