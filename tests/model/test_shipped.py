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


@pytest.mark.real_model
def test_shipped_conversion_rebuilds_from_the_teacher_and_its_delta(tmp_path, default_tokenizer):
    """`spikingbrain-smollm2` = the teacher converted with the delta's config, delta tensors in, LoRA folded by hand."""
    import json

    from safetensors import safe_open

    from spikingbrain.model.hf_import import load_transformer
    from spikingbrain.model.loading import resolve_folder
    from spikingbrain.model.shipped import shipped_delta_path

    delta = shipped_delta_path("spikingbrain-smollm2")
    assert delta.stat().st_size <= 16 * 2**20
    with safe_open(str(delta), framework="pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n).float() for n in f.keys()}
    config = json.loads(meta["config"])
    reference = load_transformer(resolve_folder(meta["teacher"]), config["layer_mixers"], sliding_window=config["sliding_window"])
    scale = json.loads(meta["lora_scale"])
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name.endswith(".lora_a"):
                params[name.replace(".lora_a", ".weight")] += scale * tensors[name.replace("_a", "_b")] @ tensor
            elif not name.endswith(".lora_b"):
                params[name].copy_(tensor)
    shipped = load_model("spikingbrain-smollm2")
    assert shipped.config.layer_mixers == ["gla", "swa"] * 15
    ids = default_tokenizer("The for statement is used to iterate over the elements of a sequence", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
        assert (shipped(ids, use_cache=False).logits - expected).abs().max() < 1e-3
    # and it exports as a folder transformers loads (our class, after `import spikingbrain`)
    assert main(["export", "spikingbrain-smollm2", str(tmp_path / "shipped")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "shipped")
    assert type(exported).__name__ == "SpikingBrainForCausalLM"
    assert (tmp_path / "shipped" / "tokenizer.json").is_file() and (tmp_path / "shipped" / "chat_template.jinja").is_file()


def test_shipped_conversion_of_reads_the_teacher_from_the_delta(tmp_path, monkeypatch):
    from safetensors import safe_open

    from spikingbrain.model import shipped

    with safe_open(str(shipped.shipped_delta_path("spikingbrain-smollm2")), framework="pt") as f:
        assert f.metadata()["teacher"] == "default"  # configs/spikingbrain-smollm2.yaml trains it from the embedded model
    assert shipped.shipped_conversion_of("default") == "spikingbrain-smollm2"
    assert shipped.shipped_conversion_of(str(tmp_path)) is None
    # an entry whose delta is not installed, looked at first, is passed over
    monkeypatch.setattr(shipped, "SHIPPED_MODELS", {"missing": "no-such-file.safetensors", **shipped.SHIPPED_MODELS})
    assert shipped.shipped_conversion_of("default") == "spikingbrain-smollm2"
    monkeypatch.setattr(shipped, "SHIPPED_MODELS", {"missing": "no-such-file.safetensors"})
    assert shipped.shipped_conversion_of("default") is None
