"""Bad checkpoints and configs fail with errors that name the file, tensor or field (and never unpickle)."""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import spikingbrain  # noqa: F401  (registers the Auto classes)
from reference_impl import TINY_OFFICIAL_CONFIG, official_state_dict, write_official_folder
from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.model.loading import load_model


def official(tmp_path, name="ckpt", config=None, state=None, shards=2):
    config = dict(TINY_OFFICIAL_CONFIG) if config is None else config
    state = official_state_dict(config) if state is None else state
    return write_official_folder(tmp_path / name, config, state, shards=shards)


def loaders(folder):
    """Every public way to load a native/official folder."""
    return {
        "load_model": lambda: load_model(folder),
        "AutoModelForCausalLM": lambda: AutoModelForCausalLM.from_pretrained(folder),
    }


def assert_all_fail(folder, *needles, exc=ValueError):
    for how, load in loaders(folder).items():
        with pytest.raises(exc) as info:
            load()
        message = str(info.value)
        for needle in needles:
            assert str(needle) in message, f"{how}: {needle!r} not in {message!r}"


def test_folder_without_config(tmp_path):
    folder = official(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError) as info:
        load_model(folder)
    assert str(folder) in str(info.value) and "config.json" in str(info.value)
    with pytest.raises(ValueError, match="config.json"):
        SpikingBrainForCausalLM.from_pretrained(folder)


def test_path_that_is_not_a_folder(tmp_path):
    with pytest.raises(ValueError) as info:
        load_model(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_invalid_json_config(tmp_path):
    folder = official(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError) as info:
        load_model(folder)
    assert str(folder / "config.json") in str(info.value)


def test_unknown_model_type(tmp_path):
    folder = official(tmp_path, config=dict(TINY_OFFICIAL_CONFIG, model_type="gpt2"))
    with pytest.raises(ValueError) as info:
        load_model(folder)
    message = str(info.value)
    assert "gpt2" in message and "model_type" in message and str(folder / "config.json") in message
    no_type = {k: v for k, v in TINY_OFFICIAL_CONFIG.items() if k != "model_type"}
    folder = official(tmp_path, "no-type", config=no_type)
    with pytest.raises(ValueError, match="model_type"):
        load_model(folder)


def test_missing_tensor(tmp_path):
    state = official_state_dict(TINY_OFFICIAL_CONFIG)
    del state["model.layers.2.attn.g_norm.weight"]
    folder = official(tmp_path, state=state)
    assert_all_fail(folder, "model.layers.2.attn.g_norm.weight", "missing", str(folder))


def test_unexpected_tensor(tmp_path):
    state = official_state_dict(TINY_OFFICIAL_CONFIG)
    state["model.layers.1.attn.gk_proj.0.weight"] = torch.zeros(16, 32)  # a gate on a sliding-window layer
    folder = official(tmp_path, state=state)
    assert_all_fail(folder, "model.layers.1.attn.gk_proj.0.weight", "unexpected", str(folder))


def test_misshaped_tensor(tmp_path):
    state = official_state_dict(TINY_OFFICIAL_CONFIG)
    state["model.layers.0.attn.k_proj.weight"] = torch.zeros(32, 32)  # 2 kv heads x 8 = 16 rows expected
    folder = official(tmp_path, state=state)
    assert_all_fail(folder, "model.layers.0.attn.k_proj.weight", "(32, 32)", "(16, 32)")


def test_corrupt_safetensors(tmp_path):
    folder = official(tmp_path)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(b"\x89garbage" * 100)
    assert_all_fail(folder, str(shard))


def test_truncated_safetensors(tmp_path):
    folder = official(tmp_path)
    shard = folder / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert_all_fail(folder, str(shard))


def test_index_naming_a_missing_shard(tmp_path):
    folder = official(tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert_all_fail(folder, "model-00002-of-00002.safetensors", "model.safetensors.index.json")


class Trap:
    """Unpickling this creates ``marker`` (no os.system needed)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_trap_works(tmp_path):
    """The trap below is real: unpickling it does create its marker."""
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(Trap(marker)))
    assert marker.exists()


@pytest.mark.parametrize("model_type", ["gla_swa", "spikingbrain", "llama"])
def test_pickle_weights_are_never_loaded(tmp_path, model_type):
    folder = tmp_path / "pickled"
    folder.mkdir()
    if model_type == "llama":
        config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2).to_dict()
    elif model_type == "spikingbrain":
        config = SpikingBrainConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2).to_dict()
    else:
        config = dict(TINY_OFFICIAL_CONFIG)
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embeddings.weight": Trap(marker)}))
    calls = [("load_model", lambda: load_model(folder))]
    if model_type != "llama":
        calls.append(("AutoModelForCausalLM", lambda: AutoModelForCausalLM.from_pretrained(folder)))
    for how, load in calls:
        with pytest.raises(ValueError) as info:
            load()
        assert "pytorch_model.bin" in str(info.value) and str(folder) in str(info.value), how
        assert not marker.exists(), f"{how} unpickled pytorch_model.bin"


def test_llama_folder_with_missing_tensor(tmp_path):
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(config.to_json_string())
    state = {k: v.contiguous() for k, v in LlamaForCausalLM(config).state_dict().items()}
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        load_model(folder)
    # reported under our name for it
    assert "model.layers.1.mlp.up_proj.weight" in str(info.value) and str(folder) in str(info.value)


TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize(
    "fields,needle",
    [
        (dict(num_hidden_layers=3, layer_mixers=["gla", "swa"]), "layer_mixers"),
        (dict(num_hidden_layers=2, layer_mixers=["gla", "mamba"]), "mamba"),
        (dict(num_hidden_layers=2, num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_hidden_layers=2, window_semantics="both"), "window_semantics"),
        (dict(num_hidden_layers=2, sliding_window=0), "sliding_window"),
        (dict(num_hidden_layers=2, gla_feature_map="elu"), "gla_feature_map"),
        (dict(num_hidden_layers=2, gla_chunk_size=0), "gla_chunk_size"),
        (dict(num_hidden_layers=2, streaming_chunk_size=0), "streaming_chunk_size"),
        (dict(num_hidden_layers=2, hidden_act="gelu"), "hidden_act"),
    ],
)
def test_invalid_config_values_name_the_field(tmp_path, fields, needle):
    with pytest.raises(ValueError, match=needle):
        SpikingBrainConfig(**{**TINY, **fields})
    # the same through a config.json in a folder
    raw = SpikingBrainConfig(**TINY, num_hidden_layers=2).to_dict()
    raw.update(fields)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=needle):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "fields,needle",
    [
        (dict(use_short_conv=True), "use_short_conv"),
        (dict(elementwise_affine=False), "elementwise_affine"),
        (dict(attn_layers=[1, 9]), "attn_layers"),
    ],
)
def test_unsupported_official_config(tmp_path, fields, needle):
    folder = official(tmp_path, config=dict(TINY_OFFICIAL_CONFIG, **fields))
    assert_all_fail(folder, needle)
