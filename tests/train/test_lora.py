"""LoRA adapters: no change at start, merged weights compute the adapted function, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spikingbrain.train.lora import add_lora, lora_parameters, merge_lora


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 6, bias=True)
        self.down_proj = nn.Linear(6, 8, bias=False)
        self.other = nn.Linear(8, 8)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.q_proj(x))) + self.other(x)


def test_adapters_start_neutral_and_merge_exactly():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(3, 8)
    before = model(x)
    wrapped = add_lora(model, rank=2, alpha=4.0, targets=("q_proj", "down_proj"))
    assert sorted(wrapped) == ["down_proj", "q_proj"]
    assert torch.equal(model(x), before)  # B starts at zero
    assert set(lora_parameters(model)) == {"q_proj.lora_a", "q_proj.lora_b", "down_proj.lora_a", "down_proj.lora_b"}
    assert not model.q_proj.base.weight.requires_grad and model.other.weight.requires_grad
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_()
    # independent reference: the adapted function written out by hand
    q, d = model.q_proj, model.down_proj
    expected = (torch.tanh(x @ (q.base.weight + 2.0 * q.lora_b @ q.lora_a).T + q.base.bias)) @ (
        d.base.weight + 2.0 * d.lora_b @ d.lora_a
    ).T + model.other(x)
    adapted = model(x)
    assert torch.allclose(adapted, expected, atol=1e-5)
    assert merge_lora(model) == 2
    assert isinstance(model.q_proj, nn.Linear) and not lora_parameters(model)
    assert torch.allclose(model(x), adapted, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(Block(), rank=0)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        add_lora(Block(), rank=2, targets=("nothing",))
