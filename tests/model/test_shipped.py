"""Short names: `spikingbrain export default` writes a folder transformers loads as its own Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from spikingbrain.cli import main
from spikingbrain.model.loading import load_model


@pytest.mark.real_model
def test_export_default_is_a_plain_llama_folder(tmp_path, capsys):
    assert main(["export", "default", str(tmp_path / "teacher")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    assert type(model) is LlamaForCausalLM
    assert not (tmp_path / "teacher" / "spikingbrain_source.json").exists()
    ids = torch.tensor([[1, 504, 3458, 314]])
    with torch.no_grad():
        assert (model(ids).logits - load_model("default")(ids, use_cache=False).logits).abs().max() < 1e-3
    assert main(["export", "default", str(tmp_path / "teacher")]) == 2
    assert "--force" in capsys.readouterr().err


#: The layouts of the shipped conversions: the SpikingBrain-7B one (GLA and SWA, no full attention; GLA in 8 of the 10 layers
#: the layer ranking says cost least), and the 76B one scaled down (every layer parallel, full attention in the three
#: layers the retrieval probe ranks highest).
SHIPPED_LAYOUTS = {
    "spikingbrain-smollm2": ["gla" if i in (4, 5, 6, 12, 14, 25, 27, 29) else "swa" for i in range(30)],
    "spikingbrain-smollm2-hybrid": ["parallel-full" if i in (0, 2, 18) else "parallel-swa" for i in range(30)],
}
#: The config keys beyond the mixers that these layouts set.
LAYOUT_KEYS = ("sliding_window", "keep_first_tokens", "parallel_combine")


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(SHIPPED_LAYOUTS))
def test_shipped_conversion_rebuilds_from_the_teacher_and_its_delta(name, tmp_path, default_tokenizer):
    """A shipped model = the teacher converted with the delta's config, delta tensors in, LoRA folded by hand."""
    import json

    from safetensors import safe_open

    from spikingbrain.model.hf_import import load_transformer
    from spikingbrain.model.loading import resolve_folder
    from spikingbrain.model.shipped import shipped_delta_path

    delta = shipped_delta_path(name)
    assert delta.stat().st_size <= 16 * 2**20
    with safe_open(str(delta), framework="pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n).float() for n in f.keys()}
    config = json.loads(meta["config"])
    layout = {key: config[key] for key in LAYOUT_KEYS if key in config}
    reference = load_transformer(resolve_folder(meta["teacher"]), config["layer_mixers"], **layout)
    scale = json.loads(meta["lora_scale"])
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for tensor_name, tensor in tensors.items():
            if tensor_name.endswith(".lora_a"):
                params[tensor_name.replace(".lora_a", ".weight")] += scale * tensors[tensor_name.replace("_a", "_b")] @ tensor
            elif not tensor_name.endswith(".lora_b"):
                params[tensor_name].copy_(tensor)
    shipped = load_model(name)
    assert shipped.config.layer_mixers == SHIPPED_LAYOUTS[name]
    ids = default_tokenizer("The for statement is used to iterate over the elements of a sequence", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
        assert (shipped(ids, use_cache=False).logits - expected).abs().max() < 1e-3
    # and it exports as a folder transformers loads (our class, after `import spikingbrain`)
    assert main(["export", name, str(tmp_path / "shipped")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "shipped")
    assert type(exported).__name__ == "SpikingBrainForCausalLM"
    assert (tmp_path / "shipped" / "tokenizer.json").is_file() and (tmp_path / "shipped" / "chat_template.jinja").is_file()


def test_shipped_conversion_of_reads_the_teacher_from_the_delta(tmp_path, monkeypatch):
    from safetensors import safe_open

    from spikingbrain.model import shipped

    for name in SHIPPED_LAYOUTS:  # configs/<name>.yaml trains each from the embedded model
        with safe_open(str(shipped.shipped_delta_path(name)), framework="pt") as f:
            assert f.metadata()["teacher"] == "default"
    assert shipped.shipped_conversions_of("default") == ["spikingbrain-smollm2", "spikingbrain-smollm2-hybrid"]
    assert shipped.shipped_conversion_of("default") == "spikingbrain-smollm2"
    assert shipped.shipped_conversion_of(str(tmp_path)) is None
    # an entry whose delta is not installed, looked at first, is passed over
    monkeypatch.setattr(shipped, "SHIPPED_MODELS", {"missing": "no-such-file.safetensors", **shipped.SHIPPED_MODELS})
    assert shipped.shipped_conversion_of("default") == "spikingbrain-smollm2"
    monkeypatch.setattr(shipped, "SHIPPED_MODELS", {"missing": "no-such-file.safetensors"})
    assert shipped.shipped_conversion_of("default") is None
