"""simulate (meta-device trace) against real CPU steps for the olmo2 and granite rows (issue 10).

Same contract as tests/test_simulate.py (DESIGN.md: within 0.1 % of peak live bytes, every term and
every phase peak); the two tiny random-init models exercise what the rows add: olmo2's post norms,
q/k norms over whole projections and fp32 rotary cos/sin, granite's embedding / residual
multipliers and logits_scaling. `python tests/test_simulate_dense_rows.py` prints the table.
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


_COMMON = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024, tie_word_embeddings=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "olmo2": dict(_COMMON, model_type="olmo2"),
    # granite-3.x's scalars; tied embeddings as the granite-3 checkpoints have them
    "granite": dict(_COMMON, model_type="granite", embedding_multiplier=12.0, residual_multiplier=0.22,
                    logits_scaling=8.0, attention_multiplier=0.015625, tie_word_embeddings=True),
}
PLANS = {
    "default-recipe": dict(seq_len=128),
    "nogc-autocast-adamw": dict(seq_len=96, optim="adamw_torch", gradient_checkpointing=False),
    "lora-bf16-nogc": dict(seq_len=96, method="lora", gradient_checkpointing=False),
    "fp32-gc-drop0": dict(seq_len=128, mixed_precision="no", lora_dropout=0.0, optim="adamw_torch"),
    "noprepare-gc-sgd": dict(seq_len=64, prepare=False, mixed_precision="no", optim="sgd"),
}
CASES = [pytest.param(c, p, id=f"{c}-{p}") for c in CONFIGS for p in PLANS]


def _plan(plan_id: str) -> TrainPlan:
    return TrainPlan(device="cpu", **PLANS[plan_id])


@pytest.mark.parametrize("cfg_id,plan_id", CASES)
def test_simulate_matches_cpu_step(cfg_id, plan_id):
    cfg, plan = CONFIGS[cfg_id], _plan(plan_id)
    real = cpu_step(cfg, plan)
    sim = simulate(cfg, plan)
    assert_simulate_matches(real, sim)


if __name__ == "__main__":  # print the table
    import warnings

    warnings.simplefilter("ignore")
    print(f"{'config-plan':36s} {'cpu_step B':>12s} {'simulate B':>12s} {'diff %':>8s}")
    for c in CONFIGS:
        for p in PLANS:
            a, b = cpu_step(CONFIGS[c], _plan(p)).peak_bytes, simulate(CONFIGS[c], _plan(p)).peak_bytes
            print(f"{c + '-' + p:36s} {a:12d} {b:12d} {100 * (b - a) / a:8.4f}")
