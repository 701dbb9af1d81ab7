"""Each static term on a hand-checkable spec (FACTS.md numbers)."""

from __future__ import annotations

import pytest

from memplan import formulas as F
from memplan.model import model_from_config
from memplan.plan import TrainPlan


def spec(**over):
    cfg = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    cfg.update(over)
    return model_from_config(cfg)


def one_linear(out_f: int, in_f: int):
    """A one-layer model whose only layer Linear is q_proj [out, in] (targets q_proj only)."""
    from memplan.model import Linear

    m = spec()
    return m.__class__(**{**m.__dict__, "layer_linears": (Linear("self_attn.q_proj", out_f, in_f),)})


def test_quant_state_4096x4096_double_quant_matches_facts():
    m, p = one_linear(4096, 4096), TrainPlan(device="cpu")
    # FACTS.md: 4096x4096 -> 8,655,940 B (0.51593 B/param) with double quant
    assert F.base_weights_bytes(m, p) + F.quant_state_bytes(m, p) == 8_655_940


def test_quant_state_without_double_quant_is_0_5625_bytes_per_param():
    m, p = one_linear(4096, 4096), TrainPlan(device="cpu", double_quant=False)
    n = 4096 * 4096
    assert F.base_weights_bytes(m, p) + F.quant_state_bytes(m, p) == n // 2 + 4 * (n // 64) + 64
    assert (n // 2 + 4 * (n // 64)) / n == 0.5625


def test_cuda_rounds_every_quant_tensor_to_512():
    m, p = one_linear(64, 64), TrainPlan()  # 4096 params: 2048 packed, 64 absmax, 4 B nested absmax
    assert F.base_weights_bytes(m, p, rnd=512) == 2048
    assert F.quant_state_bytes(m, p, rnd=512) == 512 + 512 + 512 + 512 + 1024


def test_int8_base_and_row_scales():
    m, p = one_linear(128, 256), TrainPlan(quant="int8", device="cpu")
    assert F.base_weights_bytes(m, p) == 128 * 256
    assert F.quant_state_bytes(m, p) == 4 * 128


def test_lora_params_per_layer_all_linear():
    m = spec(num_key_value_heads=8)
    H, q, kv, I, r = 4096, 4096, 1024, 11008, 16
    assert sum(F.lora_tensors(m, TrainPlan(lora_r=r))) == r * (7 * H + 2 * q + 2 * kv + 3 * I)
    assert F.adapter_weights_bytes(m, TrainPlan(lora_r=r), 1) == 4 * r * (7 * H + 2 * q + 2 * kv + 3 * I)


def test_target_modules_subset():
    m, r = spec(), 8
    assert sum(F.lora_tensors(m, TrainPlan(lora_r=r, target_modules="q_proj,v_proj"))) == r * (4 * 4096)


def test_prepare_upcasts_other_params_to_fp32():
    m = spec()
    with_prep = F.other_params_bytes(m, TrainPlan())
    without = F.other_params_bytes(m, TrainPlan(prepare=False))
    other = 2 * 32000 * 4096 + 4096 * 3  # embeddings, lm_head, 2 layer norms + final norm
    rotary = 4 * 2 * 64  # inv_freq + original_inv_freq stay fp32
    assert with_prep == 4 * other + rotary
    assert without == 2 * other + rotary


@pytest.mark.parametrize("optim, per_param", [("adamw_torch", 8), ("adamw_torch_fused", 8), ("sgd", 0)])
def test_torch_optimizer_state(optim, per_param):
    m = one_linear(1024, 1024)
    p = TrainPlan(optim=optim, lora_r=8, target_modules="q_proj", device="cpu")
    n = 8 * 1024 * 2
    dev, paged = F.optimizer_state_bytes(m, p, 1, cuda=False)
    steps = 2 * 4 if per_param else 0  # one fp32 `step` tensor per param
    assert (dev, paged) == (per_param * n + steps, 0)


def test_bnb_8bit_state_and_the_4096_element_rule():
    # A: 8 x 1024 = 8192 elements -> 8-bit; B: 4 x 8... use rank 4 on a 1024 x 1024: A 4096 (8-bit), B 4096
    m = one_linear(1024, 1024)
    p = TrainPlan(optim="adamw_bnb_8bit", lora_r=2, target_modules="q_proj", device="cpu")
    n = 2 * 1024  # 2048 < 4096 elements each: 32-bit state
    dev, _ = F.optimizer_state_bytes(m, p, 1, cuda=False)
    # the two 256-entry fp32 maps exist on the CPU anyway (Optimizer8bit.__init__ fill_qmap; measured on
    # CPU steps whose LoRA tensors are all below 4096 elements); on CUDA only once an 8-bit state copies them
    assert dev == 2 * (2 * 4 * n) + 2 * 256 * 4
    assert F.optimizer_state_bytes(m, p, 1, cuda=True)[0] == 2 * (2 * 4 * n)
    p8 = p.replace(lora_r=8)  # 8192 elements: uint8 state + fp32 absmax per 256, plus the two 256-entry maps
    n8 = 8 * 1024
    dev8, _ = F.optimizer_state_bytes(m, p8, 1, cuda=False)
    assert dev8 == 2 * (2 * (n8 + 4 * (n8 // 256))) + 2 * 1024


def test_paged_state_leaves_the_device_only_on_cuda_and_only_from_100k_elements():
    m = one_linear(8192, 8192)
    p = TrainPlan(optim="paged_adamw_8bit", lora_r=16, target_modules="q_proj")  # 131,072 elements each
    dev, paged = F.optimizer_state_bytes(m, p, 1, cuda=True)
    n = 16 * 8192
    assert paged == 2 * 2 * n  # state1 + state2, uint8, for A and B
    assert dev == 2 * 2 * 4 * (n // 256) + 2 * 1024  # absmax stays on the device
    dev_cpu, paged_cpu = F.optimizer_state_bytes(m, p, 1, cuda=False)
    assert paged_cpu == 0 and dev_cpu == dev + paged
    small = p.replace(lora_r=8)  # 65,536 elements: below the paging threshold
    assert F.optimizer_state_bytes(m, small, 1, cuda=True)[1] == 0


def test_full_finetune_gradients_cover_every_parameter():
    m = spec()
    p = TrainPlan(method="full", optim="adamw_torch", prepare=False, dtype="bf16")
    assert F.gradient_bytes(m, p) == 2 * m.params
    assert F.adapter_weights_bytes(m, p) == 0
