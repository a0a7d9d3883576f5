"""Shared pytest fixtures: the embedded default model's folder and tokenizer, and a tiny teacher/student pair."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_folder() -> Path:
    """Hugging Face folder of the embedded SmolLM2-135M-Instruct (converted once, then cached)."""
    from spikingbrain.model.embedded import default_model_folder

    return default_model_folder()


@pytest.fixture(scope="session")
def default_tokenizer(default_folder: Path):
    """Tokenizer of the embedded default model, loaded from its converted folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_folder))


@pytest.fixture(scope="session")
def pair(tmp_path_factory, default_folder):
    """(teacher folder, student folder, text folder): a tiny random Llama with the real tokenizer, and its conversion."""
    import shutil

    import torch
    from pydoc_data.topics import topics
    from transformers import LlamaConfig, LlamaForCausalLM

    from reference_impl import randomize_
    from spikingbrain.convert.converter import convert_transformer
    from spikingbrain.model.checkpoint import TOKENIZER_FILES

    root = tmp_path_factory.mktemp("pair")
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=2, bos_token_id=1)
    teacher = randomize_(LlamaForCausalLM(config), seed=5)
    with torch.no_grad():
        teacher.model.embed_tokens.weight.mul_(0.3)  # tied: logits of a few nats, not tens
    teacher.save_pretrained(root / "teacher")
    for name in TOKENIZER_FILES:
        if (default_folder / name).is_file():
            shutil.copy2(default_folder / name, root / "teacher" / name)
    convert_transformer(root / "teacher", root / "student", layout="alternating", sliding_window=16)
    data = root / "data"
    data.mkdir()
    for name in ("assignment", "for", "while", "if", "with", "try", "class", "function", "import", "lambda"):
        (data / f"{name}.txt").write_text(topics[name])
    return root / "teacher", root / "student", data
