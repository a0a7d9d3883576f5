"""Shared pytest fixtures: the embedded default model's folder and tokenizer."""

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
