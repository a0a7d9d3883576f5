"""INT8 products of frozen LoRA base weights in training steps, against integer products summed here in int64 with
the same rounding (the W8A8 simulation), and the LoRA gradients against fp32 base products."""

from __future__ import annotations

import pytest
import torch

from spikingbrain.ops.int8 import int8_matmul_available
from spikingbrain.train.int8_products import frozen_int8_linear, frozen_int8_weight, int8_frozen_products
from spikingbrain.train.lora import add_lora, lora_parameters

pytestmark = pytest.mark.skipif(not int8_matmul_available("cpu"), reason="this torch has no CPU int8 matmul")


def _codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row codes floor(x / s + 1/2) clipped to ±127 in int64, s = max|row| / 127 (1 for zeros): written out here."""
    amax = x.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.floor((x / s).double() + 0.5).clamp(-127, 127).long(), s


def _weight_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row codes of a weight, rounded half to even (as the INT8 weights of this project are)."""
    amax = w.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(w / s).clamp(-127, 127).long(), s


def test_forward_and_input_gradient_are_the_int8_products_by_hand():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    x = torch.randn(3, 7, 24, generator=gen).requires_grad_()
    x.data[0, 0] = 0.0  # a row of zeros
    weight = frozen_int8_weight(w)
    y = frozen_int8_linear(x, weight, b)
    g = torch.randn(3, 7, 40, generator=gen)
    y.backward(g)
    # forward: x's codes per row times W's codes per output channel, scaled back in fp32
    xc, xs = _codes(x.detach().reshape(-1, 24))
    wc, ws = _weight_codes(w)
    expected = ((xc @ wc.t()).float() * xs * ws.reshape(1, -1)).reshape(3, 7, 40) + b
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    # backward: g's codes per row times W's codes per input channel
    gc, gs = _codes(g.reshape(-1, 40))
    wc_in, ws_in = _weight_codes(w.t())
    expected_grad = ((gc @ wc_in.t()).float() * gs * ws_in.reshape(1, -1)).reshape(3, 7, 24)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-6, atol=1e-6)
    # and both near the fp32 products (int8 rounding)
    assert (y - (x @ w.t() + b)).abs().max() < 0.05 * (x @ w.t()).abs().max()


def _model():
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    torch.manual_seed(0)
    config = SpikingBrainConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, layer_mixers=["gla", "swa"], sliding_window=4, gla_chunk_size=8)
    model = SpikingBrainForCausalLM(config)
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model, 4)
    for name, p in lora_parameters(model).items():
        if name.endswith("lora_b"):
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_lora_layers_train_on_int8_bases_and_evaluate_in_fp32():
    model = _model()
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = model(ids).logits
    assert int8_frozen_products(model, True) == 14  # q k v o gate up down in two layers
    with torch.no_grad():  # outside a training step: the fp32 weights
        assert torch.equal(model(ids).logits, fp32)
    logits = model(ids).logits
    assert not torch.equal(logits, fp32) and (logits - fp32).abs().max() < 0.05 * fp32.abs().max()
    logits.square().mean().backward()
    grads = [p.grad for p in lora_parameters(model).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
    assert int8_frozen_products(model, False) == 14
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fp32)


def test_one_layers_adapter_gradients_do_not_depend_on_the_base_product():
    """For a fixed upstream gradient, a LoRA layer's adapter gradients are the fp32 ones (they see x and g only);
    a changed base weight is quantized again."""
    model = _model()
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(2))
    g = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    grads = []
    for enabled in (False, True):
        int8_frozen_products(model, enabled)
        layer.zero_grad()
        layer(x).backward(g)
        grads.append((layer.lora_a.grad.clone(), layer.lora_b.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    before = layer(x).detach()
    with torch.no_grad():
        layer.base.weight.mul_(2.0)
    after = layer(x).detach()
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x, layer.lora_a), layer.lora_b) * layer.scale
    torch.testing.assert_close(after - lora, 2.0 * (before - lora), rtol=1e-2, atol=1e-2)


def test_a_training_run_with_int8_frozen_products_lowers_its_loss_and_refuses_without_lora(tmp_path, pair):
    import json

    from spikingbrain.train.config import load_train_config
    from spikingbrain.train.trainer import Trainer, TrainingError

    from .test_trainer import write_config

    config = load_train_config(write_config(tmp_path / "c.yaml", pair, tmp_path / "run", steps=(12, 24), calibrate=False,
                                            int8_frozen_products=True))
    trainer = Trainer(config, progress=False)
    assert all(m.int8_base is not None for m in trainer.student.modules() if hasattr(m, "int8_base"))
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    transfer = [r["mse"] for r in records if r["stage"] == "transfer"]
    assert sum(transfer[-4:]) < 0.9 * sum(transfer[:4])
    full = write_config(tmp_path / "full.yaml", pair, tmp_path / "full", calibrate=False, int8_frozen_products=True)
    text = full.read_text().replace("trainable: lora", "trainable: all")
    full.write_text(text)
    with pytest.raises(TrainingError, match="int8_frozen_products"):
        Trainer(load_train_config(full), progress=False)
