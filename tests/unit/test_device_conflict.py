"""A device in training_args that contradicts gpu= (issue 14): use_cpu=True with a GPU named is not
silently estimated as a CPU step; the GPU wins and the notes say so."""
import pytest

import memplan
from memplan.plan import TrainPlan

NOTE = "training_args has use_cpu=True but gpu="


def _device_notes(notes):
    return [n for n in notes if n.startswith(NOTE)]


def test_use_cpu_with_gpu_estimates_the_gpu_step_and_says_so():
    e = memplan.estimate("llama-2-7b", gpu="a10g", training_args={"use_cpu": True, "bf16": True})
    assert e.plan.device == "cuda"
    (note,) = _device_notes(e.notes)
    assert "'a10g'" in note and "device='cpu'" in note
    assert e.terms == memplan.estimate("llama-2-7b", gpu="a10g", mixed_precision="bf16").terms
    assert note in e.to_dict()["notes"]


def test_check_fit_and_recommend_carry_the_note():
    f = memplan.check_fit("llama-2-7b", "a10g", training_args={"use_cpu": True})
    assert f.estimate.plan.device == "cuda" and _device_notes(f.notes)
    assert _device_notes(f.to_dict()["notes"])
    r = memplan.recommend("llama-2-7b", "a10g", training_args={"use_cpu": True})
    assert _device_notes(r.to_dict()["notes"])


def test_no_note_without_a_contradiction():
    # no GPU named: use_cpu is the only device given, a CPU step
    e = memplan.estimate("llama-2-7b", training_args={"use_cpu": True})
    assert e.plan.device == "cpu" and not _device_notes(e.notes)
    # a CPU step asked for explicitly (keyword or the plan's own field) stays one
    e = memplan.estimate("llama-2-7b", gpu="a10g", training_args={"use_cpu": True}, device="cpu")
    assert e.plan.device == "cpu" and not _device_notes(e.notes)
    e = memplan.estimate("llama-2-7b", TrainPlan(device="cpu"), gpu="a10g", training_args={"use_cpu": True})
    assert e.plan.device == "cpu" and not _device_notes(e.notes)
    # use_cpu False: nothing to say
    e = memplan.estimate("llama-2-7b", gpu="a10g", training_args={"use_cpu": False})
    assert e.plan.device == "cuda" and not _device_notes(e.notes)


def test_real_training_arguments_with_use_cpu():
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments("out", use_cpu=True, per_device_train_batch_size=2)
    e = memplan.estimate("llama-2-7b", gpu="a10g", training_args=args)
    assert e.plan.device == "cuda" and e.plan.batch_size == 2 and _device_notes(e.notes)
    assert memplan.estimate("llama-2-7b", training_args=args).plan.device == "cpu"
