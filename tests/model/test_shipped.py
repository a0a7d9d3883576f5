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
