"""The live-tensor tracker against an independent instrument: torch's allocator events (issue 8, 7a).

Every CPU agreement test takes memplan's own tracker as the truth. Here the same real CPU QLoRA steps
run under `torch.profiler(profile_memory=True)` as well (`memplan.runtime.allocator`), and both report
the same quantity: the last step's peak of live bytes minus the bytes alive when that step started
(the tracker resets its peak there; the allocator trace opens its window there).

What the allocator showed (tiny Llama, hidden 256, 2 layers, vocab 1000, 1 x 128 tokens, 2 threads):
- with gradient checkpointing the real step peaks inside the `mm` of layer 0's recomputed
  `down_proj.lora_A` ([128 x 688] @ [688 x 16], bf16 under autocast), where oneDNN's GEMM scratchpad
  (140,928 B, allocated through c10's CPU allocator and freed before the op returns) is alive. The
  dispatch mode sees op outputs only: a blind spot of 141-198 KB, 1-5 % of the step's growth. Now
  `LiveTensorTracker(kernel_workspace=True)` + `add_kernel_workspace` count it (term `workspace`).
- checkpointing's saved CPU RNG states (`torch.get_rng_state()`, 5,056 B, one per checkpointed layer
  plus one in `fork_rng` during a recompute) are built in C++: now tracked via a patched
  `torch.get_rng_state` while the tracker is active (meta traces of CPU plans see them too).
- without checkpointing the peak is at `_log_softmax_backward_data`, where no kernel holds a
  scratchpad: the two agree within 128 B.
What remains after both fixes: 8-byte scalar tensors made in C++ outside any op (<= 152 B on 19
configurations) - hence the 1 KiB tolerance below, which README.md quotes.
`python tests/runtime/test_instrument.py` prints the table over 19 configurations.
"""

from __future__ import annotations

import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.plan import TrainPlan  # noqa: E402
from memplan.runtime.allocator import allocator_peak, window  # noqa: E402
from memplan.runtime.load import adapt, load_model  # noqa: E402
from memplan.runtime.step import run_steps  # noqa: E402
from memplan.runtime.tracker import OP_MARK, LiveTensorTracker  # noqa: E402
from memplan.terms import Term  # noqa: E402

#: |allocator - tracker| after the fixes: the 8-byte C++ scalars measured <= 152 B (see module doc)
TOL_BYTES = 1024

BASE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


def measure(cfg_over: dict, plan_over: dict) -> dict:
    """Two real CPU steps under the tracker and the profiler; both peaks of the last step above its start.

    Returns the allocator's figure, the tracker's before and after `add_kernel_workspace`, and both
    instruments' objects.
    """
    cfg = {**BASE, **cfg_over}
    plan = TrainPlan(device="cpu", **{"seq_len": 128, **plan_over})
    tracker = LiveTensorTracker(device="cpu", kernel_workspace=True)
    at: dict = {}

    def on_step(msg: str) -> None:  # run_steps calls this just before the last step's reset_peak
        if msg.startswith("step 2/"):
            at["live"] = tracker.live
            at["window"] = window()
            at["window"].__enter__()

    def steps() -> None:
        model = adapt(load_model(cfg, plan), plan)
        run_steps(model, plan, vocab_size=cfg["vocab_size"], steps=2, tracker=tracker, progress=on_step)
        at["window"].__exit__(None, None, None)

    # the profiler covers the warm-up step too: a free is reported only for a block allocated under it
    trace = allocator_peak(steps, mark=OP_MARK)
    before = tracker.peak - at["live"]
    tracker.add_kernel_workspace(trace.events)  # the profiler was the caller's, so merge here
    return {"allocator": trace.peak_above_start, "before": before, "after": tracker.peak - at["live"],
            "tracker": tracker, "trace": trace, "start": at["live"]}


CASES = {
    # the default HF QLoRA recipe (checkpointing, bf16 autocast, paged 8-bit AdamW, dropout 0.05)
    "llama-gc-autocast-paged8bit": (dict(model_type="llama"), dict()),
    "llama-nogc-autocast-adamw": (dict(model_type="llama"), dict(gradient_checkpointing=False, optim="adamw_torch")),
    "phi3-gc-fp32-sgd": (dict(model_type="phi3"), dict(mixed_precision="no", optim="sgd", lora_dropout=0.0)),
}


def test_readme_quotes_this_limit():
    import sys as _sys
    from pathlib import Path

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from readme_claims import readme_row

    assert f"within {TOL_BYTES // 1024} KiB" in readme_row("tests/runtime/test_instrument.py")


@pytest.mark.parametrize("case", list(CASES))
def test_tracker_peak_matches_allocator(case):
    m = measure(*CASES[case])
    alloc, after, tracker = m["allocator"], m["after"], m["tracker"]
    print(f"\n{case:30s} allocator {alloc:>10,d} B  tracker {m['before']:>10,d} -> {after:>10,d} B  "
          f"gap {alloc - after:+,d} B")
    assert abs(alloc - after) <= TOL_BYTES, (alloc, m["before"], after)
    # the tracker alone never sees more than the allocator holds
    assert m["before"] <= alloc + TOL_BYTES
    # the terms at the peak still add up to it
    assert sum(tracker.terms_at(tracker.peak_at).values()) == tracker.peak
    # every workspace record the merge added comes from an op's own allocator events
    ws = [r for r in tracker.records if r.term == Term.WORKSPACE]
    assert all(r.nbytes > 0 and r.op for r in ws)
    if CASES[case][1].get("gradient_checkpointing", True):  # saved CPU RNG states are tracked now
        assert [r for r in tracker.records if r.op == "get_rng_state" and r.nbytes > 0]


def test_cpu_step_with_kernel_workspace_profiles_itself():
    """Without an outer profiler, run_steps(kernel_workspace=True) profiles and merges on its own."""
    from memplan.runtime.step import cpu_step

    cfg = dict(BASE, model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    res = cpu_step(cfg, TrainPlan(device="cpu", seq_len=32, optim="sgd"), kernel_workspace=True)
    assert not torch._C._autograd._profiler_enabled()
    assert sum(res.terms.values()) == res.peak_bytes
    assert res.terms[str(Term.WORKSPACE)] >= 0


def test_allocator_peak_counts_frees_and_windows():
    keep = []

    def fn():
        keep.append(torch.empty(1000, dtype=torch.uint8))  # before the window: counted in start_bytes
        with window():
            a = torch.empty(300_000, dtype=torch.uint8)
            b = torch.empty(200_000, dtype=torch.uint8)
            del a
            c = torch.empty(100_000, dtype=torch.uint8)
            del b, c
        return 7

    tr = allocator_peak(fn)
    assert tr.result == 7 and tr.windows == 1
    assert tr.start_bytes == 1000
    assert tr.peak_above_start == 500_000
    assert tr.end_bytes == 1000
    assert [a.nbytes for a in tr.allocations] == [300_000, 200_000, 100_000]
    assert all(a.free_ns is not None for a in tr.allocations)
    assert {a.nbytes for a in tr.top_at_peak()} == {300_000, 200_000}


def test_unseen_frees_are_placed_before_the_op_that_reuses_the_address():
    """A block freed on a thread the profiler does not follow (gloo's worker) has no free event; its address
    handed out again proves it was freed: `with_unseen_frees` frees it just before the op that reused it."""
    from memplan.runtime.allocator import UNSEEN_FREE, AllocEvent, trace_from_events, with_unseen_frees
    from memplan.runtime.tracker import OP_MARK

    ev = [AllocEvent(10, 0, 0xA, 4096, "cpu", ("c10d::_reduce_scatter_base_",), f"{OP_MARK}1"),  # never freed
          AllocEvent(20, 1, 0xB, 100, "cpu", ("aten::mm",), f"{OP_MARK}2"),
          AllocEvent(25, 2, 0xB, -100, "cpu", ("aten::mm",), f"{OP_MARK}2"),
          AllocEvent(40, 3, 0xB, 300, "cpu", ("aten::add",), f"{OP_MARK}3"),  # reuses B after its free: as is
          AllocEvent(60, 4, 0xA, 2048, "cpu", ("aten::empty",), f"{OP_MARK}4"),  # reuses A: A was freed
          AllocEvent(70, 5, 0xC, 64, "cpu", (), "")]  # never reused: stays alive
    ops = [(5, 15, f"{OP_MARK}1"), (18, 30, f"{OP_MARK}2"), (35, 45, f"{OP_MARK}3"), (55, 65, f"{OP_MARK}4")]
    out = with_unseen_frees(ev, ops)
    added = [e for e in out if e.scope == (UNSEEN_FREE,)]
    assert [(e.ns, e.ptr, e.delta) for e in added] == [(54, 0xA, -4096)]  # before op 4 began
    assert out.index(added[0]) == out.index(ev[4]) - 1
    assert trace_from_events(out).end_bytes == 300 + 2048 + 64
    assert trace_from_events(ev).end_bytes == 4096 + 300 + 2048 + 64  # read as is: A alive to the end
    assert with_unseen_frees(ev[1:4], ops) == ev[1:4]  # nothing unseen: the same events


def test_kernel_workspace_places_frees_outside_ops_by_the_op_ranges():
    """A free outside any op (another thread's) ends the block after the op running then, per the op ranges:
    without them, after the op of the last event seen inside an op (which may be long before)."""
    from memplan.runtime.allocator import AllocEvent
    from memplan.runtime.tracker import OP_MARK

    def freed_at(op_ranges):
        t = LiveTensorTracker(device="cpu", kernel_workspace=True)
        with t:  # ops 1..6 on the tracker's clock
            for _ in range(6):
                torch.zeros(1)
        n = len(t.records)
        ev = [AllocEvent(10, 0, 0xA, 8192, "cpu", ("aten::clone", "c10d::_reduce_scatter_base_"), f"{OP_MARK}2"),
              AllocEvent(48, 1, 0xA, -8192, "cpu", (), "")]  # freed on gloo's thread while op 4 runs
        assert t.add_kernel_workspace(ev, op_ranges=op_ranges) == 1
        return t.records[n].created, t.records[n].freed

    ops = [(10 * c, 10 * c + 9, f"{OP_MARK}{c}") for c in range(1, 7)]
    assert freed_at(ops) == (2, 4.75)  # inside op 4
    assert freed_at([(a, b - 8, m) for a, b, m in ops]) == (2, 4.5)  # after op 4 had returned
    assert freed_at(()) == (2, 2.5)  # the last op-marked event was op 2's


def test_rng_state_patch_is_scoped():
    orig = torch.get_rng_state
    t = LiveTensorTracker(device="cpu")
    with t:
        assert torch.get_rng_state is not orig
        s = torch.get_rng_state()
        with t:  # re-entered (as for bitsandbytes kernels): still patched once
            pass
        assert torch.get_rng_state is not orig
    assert torch.get_rng_state is orig and torch.random.get_rng_state is orig
    assert [r.nbytes for r in t.records if r.op == "get_rng_state"] == [s.untyped_storage().nbytes()]


def test_kernel_workspace_is_off_and_inert_on_meta():
    t = LiveTensorTracker(device=("meta", "cpu"), kernel_workspace=True)  # simulate of a CPU plan
    assert not t.kernel_workspace
    with t:
        torch.empty(4, device="meta") + 1
    assert t.add_kernel_workspace([]) == 0


# ---- the table (python tests/test_instrument.py) --------------------------------------------------
MATRIX = [
    ("llama-default-recipe", dict(model_type="llama"), dict()),
    ("llama-no-gc", dict(model_type="llama"), dict(gradient_checkpointing=False)),
    ("llama-gc-adamw-drop0", dict(model_type="llama"), dict(optim="adamw_torch", lora_dropout=0.0)),
    ("llama-no-gc-adamw-drop0", dict(model_type="llama"),
     dict(optim="adamw_torch", lora_dropout=0.0, gradient_checkpointing=False)),
    ("llama-b2s64-adamw-no-gc", dict(model_type="llama"),
     dict(batch_size=2, seq_len=64, optim="adamw_torch", gradient_checkpointing=False)),
    ("llama-b2s64-adamw-gc", dict(model_type="llama"), dict(batch_size=2, seq_len=64, optim="adamw_torch")),
    ("qwen2-no-gc", dict(model_type="qwen2"), dict(gradient_checkpointing=False)),
    ("qwen2-gc", dict(model_type="qwen2"), dict()),
    ("phi3-no-gc", dict(model_type="phi3"), dict(gradient_checkpointing=False)),
    ("phi3-gc", dict(model_type="phi3"), dict()),
    ("llama-eager-no-gc", dict(model_type="llama"), dict(attn_implementation="eager", gradient_checkpointing=False)),
    ("llama-eager-gc", dict(model_type="llama"), dict(attn_implementation="eager")),
    ("llama-sgd-no-gc", dict(model_type="llama"), dict(optim="sgd", gradient_checkpointing=False)),
    ("llama-sgd-gc", dict(model_type="llama"), dict(optim="sgd")),
    ("llama-qv-no-gc", dict(model_type="llama"), dict(target_modules="q_proj,v_proj", gradient_checkpointing=False)),
    ("llama-fp32-no-gc", dict(model_type="llama"), dict(mixed_precision="no", gradient_checkpointing=False)),
    ("llama-fp32-gc", dict(model_type="llama"), dict(mixed_precision="no")),
    ("llama-b4s128-no-gc", dict(model_type="llama"), dict(batch_size=4, gradient_checkpointing=False)),
    ("llama-b4s128-gc", dict(model_type="llama"), dict(batch_size=4)),
]


def _peak_above_reset(tracker, keep) -> int:
    """The tracker's last-step peak above its start, counting only the records `keep` accepts."""
    deltas = []
    for r in tracker.records:
        if keep(r):
            deltas.append((r.created, r.nbytes))
            if r.freed != float("inf"):
                deltas.append((r.freed, -r.nbytes))
    deltas.sort(key=lambda d: (d[0], d[1] > 0))
    live, start, peak = 0, 0, 0
    for t, d in deltas:
        live += d
        if t <= tracker._reset_clock:
            start = peak = live
        elif d > 0:
            peak = max(peak, live)
    return peak - start


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("| config | peak phase | allocator | tracker before | gap before | + RNG states | + workspace | gap after "
          "| workspace at peak | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, c, p in MATRIX:
        t0 = time.perf_counter()
        m = measure(c, p)
        tr = m["tracker"]
        a = m["allocator"]
        old = _peak_above_reset(tr, lambda r: r.term != Term.WORKSPACE and r.op != "get_rng_state")
        rng = _peak_above_reset(tr, lambda r: r.term != Term.WORKSPACE)
        ws = tr.terms_at(tr.peak_at)[str(Term.WORKSPACE)]
        print(f"| {name} | {tr.peak_phase} | {a:,} | {old:,} | {a - old:+,} ({100 * (a - old) / a:+.3f} %) | {rng:,} "
              f"| {m['after']:,} | {a - m['after']:+,} ({100 * (a - m['after']) / a:+.4f} %) | {ws:,} "
              f"| {time.perf_counter() - t0:.1f} |", flush=True)
    sys.exit(0)
