"""The library versions whose behaviour memplan models: one source (constraints.txt pins the same,
tests/unit/test_versions.py checks they agree). Every estimate names them; simulate and profile
record the versions they actually ran."""

from __future__ import annotations

MODELED_VERSIONS = {"torch": "2.13", "transformers": "5.24", "peft": "0.21.2", "bitsandbytes": "0.50.2",
                    "accelerate": "1.15"}

#: "transformers 5.24", for notes that say which release behaves so
TRANSFORMERS = f"transformers {MODELED_VERSIONS['transformers']}"

#: libraries of the recipes a plan may switch on (TRL's SFTTrainer step and activation offloading, Liger's
#: kernels, DeepSpeed ZeRO), named by an estimate only when its plan uses them; simulate records the
#: installed version
RECIPE_VERSIONS = {"trl": "1.16", "liger-kernel": "0.8.5", "deepspeed": "0.19.8"}
