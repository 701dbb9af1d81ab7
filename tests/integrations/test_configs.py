"""Config files in (issue 11): axolotl YAML, TRL SFTConfig and TrainingArguments files read into the plan,
with notes for what memplan does not model, overrides by keywords and typed flags, one-line errors.
Torch-free: the files are written here."""

from __future__ import annotations

import json
import sys

import pytest

import memplan
from memplan.cli import main
from memplan.errors import InvalidSpecError, MissingExtraError
from memplan.integrations.configs import ConfigRead, read_config
from memplan.plan import TrainPlan, plan_from

pytest.importorskip("yaml")

AXOLOTL = """\
base_model: meta-llama/Meta-Llama-3-8B
adapter: qlora
load_in_4bit: true
bnb_4bit_quant_type: fp4
bnb_4bit_use_double_quant: false
bnb_4bit_compute_dtype: float16
lora_r: 32
lora_alpha: 64
lora_dropout: 0.1
lora_target_modules:
  - q_proj
  - v_proj
micro_batch_size: 2
sequence_len: 4096
gradient_accumulation_steps: 4
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: true
optimizer: adamw_bnb_8bit
bf16: true
tf32: true
flash_attention: true
pad_to_sequence_len: true
learning_rate: 0.0002
output_dir: ./outputs/out
logging_steps: 1
datasets:
  - path: mhenrichsen/alpaca_2k_test
    type: alpaca
"""


def write(tmp_path, name: str, text: str):
    p = tmp_path / name
    p.write_text(text)
    return p


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- axolotl ----------------------------------------------------------------------------------------
def test_axolotl_every_mapped_field(tmp_path):
    r = read_config(write(tmp_path, "ax.yml", AXOLOTL))
    assert isinstance(r, ConfigRead) and r.kind == "axolotl"
    assert r.model == "meta-llama/Meta-Llama-3-8B"
    assert r.plan_fields == {
        "method": "qlora", "quant": "fp4", "double_quant": False, "compute_dtype": "fp16",
        "lora_r": 32, "lora_alpha": 64, "lora_dropout": 0.1, "target_modules": ("q_proj", "v_proj"),
        "dtype": "bf16", "mixed_precision": "bf16", "batch_size": 2, "seq_len": 4096,
        "gradient_accumulation_steps": 4, "gradient_checkpointing": True, "use_reentrant": True,
        "optim": "adamw_bnb_8bit", "attn_implementation": "flash_attention_2", "padding": "max_length"}
    assert r.notes == ()  # learning rate, logging, output_dir, datasets, tf32: no memory, no notes
    plan = plan_from(config=r)
    assert plan.quant == "fp4" and plan.target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize("extra, expect", [
    ("sdp_attention: true\n", {"attn_implementation": "sdpa"}),
    ("eager_attention: true\n", {"attn_implementation": "eager"}),
    ("attn_implementation: eager\n", {"attn_implementation": "eager"}),
    ("", {"padding": "longest", "quant": "nf4", "double_quant": True, "compute_dtype": "bf16"}),
    ("lora_target_linear: true\n", {"target_modules": "all-linear"}),
    ("gradient_checkpointing: false\n", {"gradient_checkpointing": False}),
    ("padding: none\n", {"padding": "none"}),
    ("bnb_config_kwargs:\n  bnb_4bit_quant_type: fp4\n  bnb_4bit_use_double_quant: false\n",
     {"quant": "fp4", "double_quant": False}),
])
def test_axolotl_variants(tmp_path, extra, expect):
    base = "base_model: llama-3.2-1b\nadapter: qlora\nload_in_4bit: true\nbf16: true\n"
    r = read_config(write(tmp_path, "ax.yaml", base + extra))
    for k, v in expect.items():
        assert r.plan_fields[k] == v, k


def test_axolotl_8bit_lora_full_and_precisions(tmp_path):
    r = read_config(write(tmp_path, "a.yml", "base_model: x\nadapter: lora\nload_in_8bit: true\nfp16: true\n"))
    assert (r.plan_fields["method"], r.plan_fields["quant"]) == ("qlora", "int8")
    assert (r.plan_fields["mixed_precision"], r.plan_fields["dtype"]) == ("fp16", "fp16")
    r = read_config(write(tmp_path, "b.yml", "base_model: x\nadapter: lora\nbf16: true\n"))
    assert r.plan_fields["method"] == "lora" and TrainPlan(**r.plan_fields).quant == "none"
    r = read_config(write(tmp_path, "c.yml", "base_model: x\nmicro_batch_size: 1\n"))
    assert (r.plan_fields["method"], r.plan_fields["mixed_precision"], r.plan_fields["dtype"]) == ("full", "no", "fp32")


def test_axolotl_unmodelled_techniques_are_named_in_the_notes(tmp_path):
    text = AXOLOTL.replace("gradient_checkpointing: true", "gradient_checkpointing: offload").replace(
        "pad_to_sequence_len: true", "sample_packing: true").replace("flash_attention: true", "xformers_attention: true")
    text += """\
plugins:
  - axolotl.integrations.liger.LigerPlugin
  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin
liger_fused_linear_cross_entropy: true
liger_rms_norm: true
cut_cross_entropy: true
chunked_cross_entropy: true
activation_offloading: true
deepspeed: deepspeed_configs/zero3_bf16.json
fsdp:
  - full_shard
peft_use_dora: true
torch_compile: false
"""
    r = read_config(write(tmp_path, "ax.yml", text))
    notes = "\n".join(r.notes)
    for word in ("sample_packing", "liger_fused_linear_cross_entropy",
                 "liger_rms_norm", "cut_cross_entropy", "chunked_cross_entropy",
                 "deepspeed", "fsdp", "multi-GPU", "peft_use_dora", "xformers_attention"):
        assert word in notes, word
    assert "torch_compile" not in notes  # switched off
    assert "offload" not in notes  # both offloading keys are plan fields now
    assert r.plan_fields["gradient_checkpointing"] is True and r.plan_fields["padding"] == "none"
    assert r.plan_fields["checkpoint_offload"] is True and r.plan_fields["activation_offloading"] is True
    assert r.plan_fields["attn_implementation"] == "sdpa"
    assert all(n.startswith("config file: ") for n in r.notes)


# -- TRL SFTConfig / TrainingArguments ------------------------------------------------------------------
SFT = {
    "output_dir": "out", "learning_rate": 2e-4, "logging_steps": 10,
    "per_device_train_batch_size": 4, "gradient_accumulation_steps": 8, "max_length": 2048,
    "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True},
    "optim": "paged_adamw_32bit", "bf16": False, "fp16": True,
    "model_init_kwargs": {"attn_implementation": "eager", "dtype": "float16",
                          "quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                  "bnb_4bit_use_double_quant": True,
                                                  "bnb_4bit_compute_dtype": "float16"}},
}


def test_trl_sftconfig_json_every_mapped_field(tmp_path):
    r = read_config(write(tmp_path, "sft.json", json.dumps(SFT)))
    assert r.kind == "trl" and r.model is None
    assert r.plan_fields == {
        "batch_size": 4, "gradient_accumulation_steps": 8, "gradient_checkpointing": True, "use_reentrant": True,
        "optim": "paged_adamw_32bit", "mixed_precision": "fp16", "attn_implementation": "eager", "dtype": "fp16",
        "method": "qlora", "quant": "nf4", "double_quant": True, "compute_dtype": "fp16", "seq_len": 2048,
        "padding": "longest", "trainer": "sft", "prepare": False}  # SFTTrainer's step; it never prepares
    assert r.notes == ()  # the adapter comes from quantization_config: no default-adapter note


def test_trl_unmodelled_techniques_and_defaults(tmp_path):
    cfg = {"output_dir": "o", "max_seq_length": 1024, "packing": True, "padding_free": True,
           "use_liger_kernel": True, "activation_offloading": True, "fsdp": "full_shard auto_wrap",
           "deepspeed": {"zero_optimization": {"stage": 3}}, "torch_compile": True}
    r = read_config(write(tmp_path, "sft.json", json.dumps(cfg)))
    notes = "\n".join(r.notes)
    for word in ("use_liger_kernel", "fsdp", "deepspeed",
                 "torch_compile", "does not say the adapter"):
        assert word in notes, word
    assert "offload" not in notes and r.plan_fields["activation_offloading"] is True
    assert r.plan_fields["seq_len"] == 1024 and r.plan_fields["padding"] == "none"
    assert r.plan_fields["packing"] is True and r.plan_fields["padding_free"] is True  # mapped (issue 11)
    assert r.plan_fields["mixed_precision"] == "bf16"  # SFTConfig: bf16 = not fp16
    r = read_config(write(tmp_path, "sft2.json", json.dumps({"packing": False, "dataset_text_field": "text"})))
    assert r.plan_fields["seq_len"] == 1024 and "SFTConfig's default" in "\n".join(r.notes)


def test_offloading_keys(tmp_path):
    """TRL activation_offloading and axolotl's activation_offloading / gradient_checkpointing: offload
    are plan fields; the variants memplan does not model are notes; a bad value is one line."""
    r = read_config(write(tmp_path, "sft.json", json.dumps({"output_dir": "o", "max_length": 512,
                                                             "activation_offloading": False})))
    assert r.plan_fields["activation_offloading"] is False
    ax = AXOLOTL.replace("gradient_checkpointing: true", "gradient_checkpointing: offload")
    r = read_config(write(tmp_path, "a.yml", ax))
    assert r.plan_fields["checkpoint_offload"] is True and "activation_offloading" not in r.plan_fields
    r = read_config(write(tmp_path, "b.yml", AXOLOTL + "activation_offloading: legacy\n"))
    assert r.plan_fields["activation_offloading"] is True
    r = read_config(write(tmp_path, "c.yml", AXOLOTL + "activation_offloading: disk\n"))
    assert "activation_offloading" not in r.plan_fields and any("disk" in n for n in r.notes)
    r = read_config(write(tmp_path, "d.yml", AXOLOTL.replace("gradient_checkpointing: true",
                                                            "gradient_checkpointing: offload_disk")))
    assert "checkpoint_offload" not in r.plan_fields and any("offload_disk" in n for n in r.notes)
    with pytest.raises(InvalidSpecError, match="activation_offloading must be true or false"):
        read_config(write(tmp_path, "e.yml", AXOLOTL + "activation_offloading: 3\n"))


def test_trl_cli_yaml_with_model_config_fields(tmp_path):
    text = """\
model_name_or_path: Qwen/Qwen2.5-0.5B
dtype: bfloat16
attn_implementation: sdpa
use_peft: true
load_in_4bit: true
use_bnb_nested_quant: false
lora_r: 8
lora_alpha: 16
lora_dropout: 0.0
lora_target_modules: [q_proj, k_proj]
per_device_train_batch_size: 2
max_length: 512
"""
    r = read_config(write(tmp_path, "trl.yaml", text))
    assert r.kind == "trl" and r.model == "Qwen/Qwen2.5-0.5B"
    f = r.plan_fields
    assert (f["method"], f["quant"], f["double_quant"], f["dtype"], f["attn_implementation"]) == \
        ("qlora", "nf4", False, "bf16", "sdpa")
    assert (f["lora_r"], f["lora_alpha"], f["lora_dropout"], f["target_modules"]) == (8, 16, 0.0, ("k_proj", "q_proj"))
    r = read_config(write(tmp_path, "full.yaml", "model_name_or_path: m\nuse_peft: false\nmax_length: 64\n"))
    assert r.plan_fields["method"] == "full"


def test_training_arguments_json(tmp_path):
    ta = {"output_dir": "o", "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
          "optim": "adamw_torch", "gradient_checkpointing": False, "use_cpu": True, "save_steps": 500}
    r = read_config(write(tmp_path, "ta.json", json.dumps(ta)))
    assert r.kind == "training_args"
    assert r.plan_fields == {"batch_size": 8, "gradient_accumulation_steps": 2, "gradient_checkpointing": False,
                             "optim": "adamw_torch", "mixed_precision": "no"}  # HF: bf16/fp16 default False
    notes = "\n".join(r.notes)
    assert "no sequence length" in notes and "use_cpu" in notes and "adapter" in notes


# -- the API: notes in the estimate, keyword arguments override the file --------------------------------
def test_estimate_with_config_notes_and_overrides(tmp_path):
    path = write(tmp_path, "ax.yml", AXOLOTL.replace("meta-llama/Meta-Llama-3-8B", "llama-3.2-1b")
                 + "sample_packing: true\n")
    e = memplan.estimate(config=str(path))  # the model from the file
    assert e.plan.batch_size == 2 and e.plan.seq_len == 4096 and e.plan.optim == "adamw_bnb_8bit"
    assert any("sample_packing" in n for n in e.notes)
    e2 = memplan.estimate("llama-3.2-1b", config=path, batch_size=1, optim="paged_adamw_8bit")
    assert (e2.plan.batch_size, e2.plan.optim, e2.plan.seq_len) == (1, "paged_adamw_8bit", 4096)
    assert plan_from(config=path, seq_len=128).seq_len == 128
    f = memplan.check_fit("llama-3.2-1b", "h200", config=path)
    assert any("sample_packing" in n for n in f.notes)
    rec = memplan.recommend("llama-3.2-1b", "h200", config=path)
    assert any("sample_packing" in n for n in rec.notes) and rec.plan.seq_len == 4096


# -- the CLI -----------------------------------------------------------------------------------------
def test_cli_config_without_model_and_typed_flags_override(tmp_path, capsys):
    path = write(tmp_path, "ax.yml", AXOLOTL.replace("meta-llama/Meta-Llama-3-8B", "llama-3.2-1b")
                 + "activation_offloading: true\n")
    code, out, err = run(capsys, "estimate", "--config", path, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["plan"]["batch_size"] == 2 and d["plan"]["seq_len"] == 4096 and d["plan"]["quant"] == "fp4"
    assert d["plan"]["activation_offloading"] is True and d["host"]["bytes"] > 0
    assert any("activation offloading" in n for n in d["notes"])
    code, out, err = run(capsys, "estimate", "llama-3.2-1b", "--config", path, "--batch-size", "3",
                         "--no-gradient-checkpointing", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert (d["plan"]["batch_size"], d["plan"]["gradient_checkpointing"], d["plan"]["seq_len"]) == (3, False, 4096)
    code, out, err = run(capsys, "estimate", "--config", path)
    assert code == 0 and "activation offloading" in out and "host RAM: " in out
    for cmd in ("fit", "recommend"):
        code, out, err = run(capsys, cmd, "--config", path, "--gpu", "h200", "--json")
        assert code == 0, err
        assert any("activation offloading" in n for n in json.loads(out)["notes"]), cmd


BAD = [
    ("bad.yml", "base_model: x\nadapter: [unclosed\n", "not valid YAML"),
    ("list.yml", "- a\n- b\n", "not a mapping"),
    ("bad.json", "{\"per_device_train_batch_size\": 2,", "not valid JSON"),
    ("both.yml", "base_model: x\nadapter: qlora\nload_in_4bit: true\nbf16: true\nfp16: true\n", "bf16 and fp16"),
    ("quant.yml", "base_model: x\nadapter: lora\nload_in_4bit: true\nload_in_8bit: true\n", "load_in_4bit and load_in_8bit"),
    ("qlora.yml", "base_model: x\nadapter: qlora\n", "adapter qlora needs load_in_4bit"),
    ("optim.yml", "base_model: x\noptimizer: adamw_hyper\n", "optimizer 'adamw_hyper'"),
    ("batch.yml", "base_model: x\nmicro_batch_size: 0\n", "micro_batch_size must be a positive integer"),
    ("len.json", json.dumps({"max_length": 512, "max_seq_length": 1024, "packing": False}), "max_length 512 and max_seq_length 1024"),
    ("peft.json", json.dumps({"use_peft": False, "load_in_4bit": True, "max_length": 8}), "use_peft: false"),
    ("what.yml", "foo: 1\nbar: 2\n", "not an axolotl, TRL SFTConfig or TrainingArguments config"),
    ("missing.yml", None, "no such file"),
]


@pytest.mark.parametrize("name, text, words", BAD, ids=[b[0] for b in BAD])
def test_bad_files_one_line_exit_2(tmp_path, capsys, name, text, words):
    path = write(tmp_path, name, text) if text is not None else tmp_path / name
    code, out, err = run(capsys, "estimate", "llama-3.2-1b", "--config", path)
    assert code == 2
    assert err.startswith("memplan: error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err
    with pytest.raises(InvalidSpecError):
        read_config(path)


def test_config_without_a_model_and_no_model_given(tmp_path, capsys):
    path = write(tmp_path, "ta.json", json.dumps({"per_device_train_batch_size": 1, "output_dir": "o"}))
    code, out, err = run(capsys, "estimate", "--config", path)
    assert code == 2 and "names no model" in err and err.count("\n") == 1
    code, out, err = run(capsys, "estimate")
    assert code == 2 and "give MODEL" in err


def test_yaml_without_pyyaml_names_the_extra_and_json_still_works(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    with pytest.raises(MissingExtraError, match=r"memplan\[config\]"):
        read_config(write(tmp_path, "ax.yml", AXOLOTL))
    code, out, err = run(capsys, "estimate", "llama-3.2-1b", "--config", tmp_path / "ax.yml")
    assert code == 2 and "memplan[config]" in err and err.count("\n") == 1
    r = read_config(write(tmp_path, "sft.json", json.dumps(SFT)))
    assert r.plan_fields["batch_size"] == 4


def test_transformers_5_activation_checkpointing_names(tmp_path):
    ta = {"output_dir": "o", "activation_checkpointing": True, "gradient_checkpointing": True,
          "activation_checkpointing_kwargs": {"use_reentrant": True}, "fsdp": [], "deepspeed": None,
          "fsdp_config": {"min_num_params": 0, "xla": False}, "bf16": True}
    r = read_config(write(tmp_path, "ta.json", json.dumps(ta)))
    assert r.plan_fields["gradient_checkpointing"] is True and r.plan_fields["use_reentrant"] is True
    assert not any("fsdp" in n or "deepspeed" in n for n in r.notes)  # switched off: no note
    ta["gradient_checkpointing"] = False
    with pytest.raises(InvalidSpecError, match="gradient_checkpointing False and activation_checkpointing True"):
        read_config(write(tmp_path, "ta2.json", json.dumps(ta)))


# -- Liger kernels (tests/test_liger.py checks what they change; here: the files' fields map onto the plan) --
LIGER_AXOLOTL = AXOLOTL + """\
plugins:
  - axolotl.integrations.liger.LigerPlugin
liger_rope: true
liger_rms_norm: true
liger_glu_activation: true
liger_fused_linear_cross_entropy: true
"""


def test_axolotl_liger_plugin_keys_are_the_kernels(tmp_path):
    r = read_config(write(tmp_path, "liger.yml", LIGER_AXOLOTL))
    f = r.plan_fields
    assert f["use_liger_kernel"] is True
    assert f["liger_kernel_config"] == {"cross_entropy": False, "fused_linear_cross_entropy": True, "geglu": True,
                                        "layer_norm": False, "rms_norm": True, "rope": True, "swiglu": True}
    p = TrainPlan(**f)
    assert p.use_liger_kernel and dict(p.liger_kernel_config)["swiglu"]
    only_flce = LIGER_AXOLOTL.replace("liger_rope: true\nliger_rms_norm: true\nliger_glu_activation: true\n", "")
    f = read_config(write(tmp_path, "flce.yml", only_flce)).plan_fields
    assert [k for k, v in f["liger_kernel_config"].items() if v] == ["fused_linear_cross_entropy"]
    # the file's Liger plugin changes the estimate: no [tokens x vocab] logits at the loss stage
    on = memplan.estimate(config=write(tmp_path, "flce2.yml", only_flce), gpu="rtx-4090")
    off = memplan.estimate(config=write(tmp_path, "plain.yml", AXOLOTL), gpu="rtx-4090")
    assert on.plan.use_liger_kernel and not off.plan.use_liger_kernel
    assert on.allocated_bytes < off.allocated_bytes
    assert any("LigerPlugin" in n for n in on.notes) and any("Triton (GPU only)" in n for n in on.notes)


def test_axolotl_liger_keys_without_the_plugin_and_bad_values(tmp_path):
    r = read_config(write(tmp_path, "np.yml", AXOLOTL + "liger_fused_linear_cross_entropy: true\n"))
    assert "use_liger_kernel" not in r.plan_fields
    assert any("without plugins" in n and "liger_fused_linear_cross_entropy" in n for n in r.notes)
    with pytest.raises(InvalidSpecError, match="liger_rope must be true or false"):
        read_config(write(tmp_path, "bad.yml", LIGER_AXOLOTL + "liger_rope: sometimes\n"))


def test_trainingarguments_liger_fields(tmp_path):
    ta = {"output_dir": "o", "per_device_train_batch_size": 1, "use_liger_kernel": True,
          "liger_kernel_config": {"rope": False}, "bf16": True}
    r = read_config(write(tmp_path, "ta.json", json.dumps(ta)))
    assert r.kind == "training_args"
    assert (r.plan_fields["use_liger_kernel"], r.plan_fields["liger_kernel_config"]) == (True, {"rope": False})
    assert TrainPlan(**r.plan_fields).liger_kernel_config == (("rope", False),)
    assert not any("liger_kernel_config" in n and "changes memory" in n for n in r.notes)
    r = read_config(write(tmp_path, "ta2.json", json.dumps({**ta, "use_liger_kernel": False})))
    assert r.plan_fields["use_liger_kernel"] is False and "liger_kernel_config" not in r.plan_fields
    assert any("use_liger_kernel is not" in n for n in r.notes)
    with pytest.raises(InvalidSpecError, match="liger_kernel_config must be a mapping"):
        read_config(write(tmp_path, "ta3.json", json.dumps({**ta, "liger_kernel_config": ["rope"]})))


def test_trl_sfttrainer_keeps_only_liger_layer_kernels(tmp_path, capsys):
    cfg = {**SFT, "use_liger_kernel": True}
    r = read_config(write(tmp_path, "sft.json", json.dumps(cfg)))
    assert r.plan_fields["use_liger_kernel"] is True
    assert r.plan_fields["liger_kernel_config"] == {"fused_linear_cross_entropy": False}
    assert any("SFTTrainer" in n and "fused LM head" in n for n in r.notes)
    bad = write(tmp_path, "bad.json", json.dumps({**cfg, "liger_kernel_config": {"fused_linear_cross_entropy": True}}))
    with pytest.raises(InvalidSpecError, match="refused by TRL"):
        read_config(bad)
    assert main(["estimate", "llama-3-8b", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "refused by TRL" in err and "Traceback" not in err
# -- packing / padding-free (issue 11): TRL's packing, packing_strategy, padding_free; axolotl's sample_packing
@pytest.mark.parametrize("cfg, packing, padding_free, note", [
    # trl 1.16 SFTTrainer: padding_free = padding_free or (packing and strategy in {bfd, bfd_split})
    ({"packing": True}, True, True, "turns padding_free on"),
    ({"packing": True, "packing_strategy": "bfd_split"}, True, True, "turns padding_free on"),
    ({"packing": True, "packing_strategy": "bfd-requeue"}, True, True, "turns padding_free on"),
    ({"packing": True, "packing_strategy": "wrapped"}, False, False, "wrapped"),
    ({"packing": True, "packing_strategy": "wrapped", "padding_free": True}, False, True, "wrapped"),
    ({"padding_free": True}, False, True, None),
    ({"packing": True, "padding_free": True}, True, True, None),
])
def test_trl_packing_fields(tmp_path, cfg, packing, padding_free, note):
    r = read_config(write(tmp_path, "sft.json", json.dumps({"output_dir": "o", "max_length": 512, **cfg})))
    assert r.plan_fields.get("packing") == packing and r.plan_fields["padding_free"] is padding_free
    assert r.plan_fields["padding"] == "none"
    notes = "\n".join(r.notes)
    assert (note in notes) if note else "packing" not in notes
    plan = TrainPlan(**r.plan_fields)  # a valid plan
    assert plan.padding_free is padding_free


def test_trl_packing_off_keeps_padded_rows(tmp_path):
    r = read_config(write(tmp_path, "sft.json", json.dumps({"output_dir": "o", "max_length": 512, "packing": False,
                                                             "padding_free": False})))
    assert "packing" not in r.plan_fields and "padding_free" not in r.plan_fields
    assert r.plan_fields["padding"] == "longest"


def test_trl_bad_packing_strategy_is_one_line_naming_the_field(tmp_path):
    path = write(tmp_path, "sft.json", json.dumps({"output_dir": "o", "packing": True, "packing_strategy": "ffd"}))
    with pytest.raises(InvalidSpecError, match="packing_strategy 'ffd' is not one of: bfd, bfd_split, wrapped"):
        read_config(path)


def test_axolotl_sample_packing_and_flash_attention(tmp_path):
    r = read_config(write(tmp_path, "ax.yml", AXOLOTL + "sample_packing: true\n"))
    assert r.plan_fields["packing"] is True and r.plan_fields["padding"] == "none"
    assert r.plan_fields["attn_implementation"] == "flash_attention_2"
    assert "padding_free" not in r.plan_fields
    assert any("sample_packing: true" in n and "--packing" in n for n in r.notes)
    e = memplan.estimate("llama-3.2-1b", config=r)
    assert e.plan.packing and e.plan.attn_implementation == "flash_attention_2"
    assert any(n.startswith("packed batch: 2 row(s) of 4096 tokens") for n in e.notes)


def test_packing_from_an_sftconfig_like_object():
    args = {"per_device_train_batch_size": 2, "packing": True, "packing_strategy": "bfd", "padding_free": False}
    assert plan_from(training_args=args).padding_free is True
    assert plan_from(training_args={**args, "packing_strategy": "wrapped"}).packing is False
