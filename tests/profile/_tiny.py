"""The tiny random model of the profiler tests (imported by the test modules: tests/ is not a package)."""

from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"

#: hidden 64, 2 layers: a CPU step takes well under a second
TINY = dict(_name_or_path="tiny-test-llama", model_type="llama", hidden_size=64, intermediate_size=172,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
