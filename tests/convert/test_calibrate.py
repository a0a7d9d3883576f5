"""Closed-form GLA calibration: the output-norm scales are the least-squares optimum against the teacher.

Reference: the residual ``|mixer_pre_o_proj(x) - teacher_pre_o_proj(x)|²`` recomputed with autograd
from hooks; at the optimum its gradient with respect to the norm weight vanishes, and the error
is no larger than with weight 0 (skipping attention) or weight 1.
"""

from __future__ import annotations

import copy

import torch

from reference_impl import randomize_
from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.convert.calibrate import calibrate_gla


def tiny_model(layer_mixers, seed):
    config = SpikingBrainConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=len(layer_mixers),
                                num_attention_heads=4, num_key_value_heads=2, layer_mixers=layer_mixers, sliding_window=5,
                                gla_chunk_size=16)
    return randomize_(SpikingBrainForCausalLM(config), seed).eval()


def _pre_o(mixer, x, inputs):
    seen = {}

    def keep(module, args):
        seen["o"] = args[0]

    handle = mixer.o_proj.register_forward_pre_hook(keep)
    try:
        mixer(x, inputs, None)
    finally:
        handle.remove()
    return seen["o"]


def test_norm_weights_are_the_least_squares_fit():
    teacher = tiny_model(["full", "full", "full"], seed=1).double()
    student = copy.deepcopy(tiny_model(["gla", "swa", "gla"], seed=2)).double()
    for i in range(3):  # the conversion reuses the teacher's projections
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(student.model.layers[i].attn, name).load_state_dict(getattr(teacher.model.layers[i].attn, name).state_dict())
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    captured = {}

    def layer_input(i):
        def keep(module, args):
            captured[i] = (args[0], args[1])

        return keep

    def attention_output(i):
        def keep(module, args):
            captured[f"o{i}"] = args[0]

        return keep

    hooks = [teacher.model.layers[i].attn.register_forward_pre_hook(layer_input(i)) for i in (0, 2)]
    hooks += [teacher.model.layers[i].attn.o_proj.register_forward_pre_hook(attention_output(i)) for i in (0, 2)]
    with torch.no_grad():
        teacher(ids, use_cache=False)
    for h in hooks:
        h.remove()
    errors = calibrate_gla(student, teacher, ids)
    assert sorted(errors) == [0, 2]
    for i in (0, 2):
        mixer = student.model.layers[i].attn
        x, inputs = captured[i]
        target = captured[f"o{i}"]
        weight = mixer.g_norm.weight
        weight.requires_grad_(True)
        residual = (_pre_o(mixer, x, inputs) - target).pow(2).sum()
        (grad,) = torch.autograd.grad(residual, weight)
        assert grad.abs().max() < 1e-6 * residual.item()
        relative = residual.item() / target.pow(2).sum().item()
        assert abs(relative - errors[i]) < 1e-9
        with torch.no_grad():
            for value in (0.0, 1.0):
                trial = copy.deepcopy(mixer)
                trial.g_norm.weight.fill_(value)
                assert relative <= (_pre_o(trial, x, inputs) - target).pow(2).sum().item() / target.pow(2).sum().item() + 1e-12
