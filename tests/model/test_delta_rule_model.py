"""Models whose GLA layers write their state by the gated delta rule (``gla_update="delta"``), against the fp64
reference forward of tests/reference_impl.py (the delta rule in its matrix form), through the cache, with padding,
and the places that refuse them."""

from __future__ import annotations

import pytest
import torch

from reference_impl import assert_close, reference_logits, spec_for

TOL = 5e-5
LAYOUTS = {"7b-layout": ["gla", "swa", "gla", "swa"], "gla-full": ["gla", "full", "gla"], "parallel": ["parallel-swa", "gla"]}


def random_ids(B, T, seed=0, vocab=97):
    return torch.randint(1, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def expected(model, ids):
    return reference_logits(model.state_dict(), spec_for(model.config), ids)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_forward_matches_the_reference(tiny_model, layout):
    """40 tokens: longer than the window and than two GLA chunks of 16; the chunked kernel (grad on)."""
    model = tiny_model(LAYOUTS[layout], gla_update="delta")
    ids = random_ids(2, 40)
    logits = model(ids, use_cache=False).logits
    assert logits.requires_grad
    assert_close(logits, expected(model, ids), TOL, layout)


def test_the_delta_rule_changes_the_model(tiny_model):
    additive = tiny_model(LAYOUTS["7b-layout"])
    delta = tiny_model(LAYOUTS["7b-layout"], gla_update="delta")
    ids = random_ids(1, 40)
    with torch.no_grad():
        assert (additive(ids).logits - delta(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("pieces", [[10] + [1] * 30, [3, 1, 9, 2, 17, 1, 7]], ids=["prefill-then-tokens", "uneven"])
def test_pieces_through_the_cache_equal_one_shot(tiny_model, pieces):
    """Short pieces take the recurrent kernel, long ones the chunked one, each from the cached state."""
    model = tiny_model(LAYOUTS["gla-full"], gla_update="delta", num_key_value_heads=1)
    ids = random_ids(2, 40)
    cache, logits, start = None, [], 0
    with torch.no_grad():
        for size in pieces:
            out = model(ids[:, start : start + size], cache=cache, use_cache=True)
            cache, start = out.cache, start + size
            logits.append(out.logits)
    assert_close(torch.cat(logits, 1), expected(model, ids), TOL, f"pieces {pieces}")


def test_left_padding_neither_writes_nor_decays_the_state(tiny_model):
    model = tiny_model(LAYOUTS["7b-layout"], gla_update="delta")
    ids = random_ids(2, 30)
    padded = torch.cat((torch.zeros(2, 4, dtype=torch.long), ids), 1)
    padded[0, :4] = ids[0, :4]  # row 0: 34 real tokens; row 1: 4 pads, then its 30 tokens
    mask = torch.ones_like(padded)
    mask[1, :4] = 0
    with torch.no_grad():
        both = model(padded, attention_mask=mask).logits
    assert_close(both[1, 4:], expected(model, ids[1:])[0], TOL, "padded row")


def test_unknown_update_rules_and_the_official_format_are_refused(tiny_model):
    from spikingbrain import SpikingBrainConfig
    from spikingbrain.model.official_format import official_config_dict

    with pytest.raises(ValueError, match=r"gla_update='sum'; use one of \['additive', 'delta'\]"):
        SpikingBrainConfig(num_hidden_layers=1, layer_mixers=["gla"], gla_update="sum")
    with pytest.raises(ValueError, match="gla_update='delta' .official: additive GLA."):
        official_config_dict(tiny_model(LAYOUTS["7b-layout"], gla_update="delta").config)


def test_sequence_parallel_prefill_refuses_the_delta_rule(tiny_model):
    from spikingbrain.distributed.prefill import sequence_parallel_prefill

    with pytest.raises(ValueError, match="gla_update='delta'.*prefill on one process"):
        sequence_parallel_prefill(tiny_model(LAYOUTS["7b-layout"], gla_update="delta"), random_ids(1, 8))
