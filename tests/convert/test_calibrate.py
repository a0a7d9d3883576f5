"""Closed-form GLA calibration: the output-norm scales are the least-squares optimum against the teacher.

Reference: the residual ``|mixer_pre_o_proj(x) - teacher_pre_o_proj(x)|²`` recomputed with autograd
from hooks; at the optimum its gradient with respect to the norm weight vanishes, and the error
is no larger than with weight 0 (skipping attention) or weight 1.
"""

from __future__ import annotations

import copy

import pytest
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


def _brute_force_attention(attention, x, inputs):
    """Softmax weights ``[B, H, T, T]`` and outputs ``[B, T, H, D]`` of one attention layer, one dot product at a time."""
    from spikingbrain.ops.rotary import apply_rotary

    q, k, v = attention.project(x)
    q, k = apply_rotary(q, inputs.cos, inputs.sin), apply_rotary(k, inputs.cos, inputs.sin)
    B, T, H, D = q.shape
    group = H // k.shape[2]
    weights = torch.zeros(B, H, T, T, dtype=torch.float64)
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                scores = [float(q[b, t, h] @ k[b, s, h // group]) / D**0.5 for s in range(t + 1)]
                top = max(scores)
                exps = [torch.tensor(z - top, dtype=torch.float64).exp() for z in scores]
                total = sum(exps)
                for s in range(t + 1):
                    weights[b, h, t, s] = exps[s] / total
                    out[b, t, h] += weights[b, h, t, s] * v[b, s, h // group].double()
    return weights, out


def _mean_distance(weights, skip_first):
    """Per-head mean distance over queries t >= skip_first, weights renormalised over keys s >= skip_first."""
    B, H, T, _ = weights.shape
    result = torch.zeros(H, dtype=torch.float64)
    for h in range(H):
        values = []
        for b in range(B):
            for t in range(skip_first, T):
                kept = weights[b, h, t, skip_first : t + 1]
                values.append(float(sum(p * (t - skip_first - j) for j, p in enumerate(kept)) / kept.sum()))
        result[h] = sum(values) / len(values)
    return result


def test_mean_attention_distance_matches_brute_force():
    from spikingbrain.convert.calibrate import mean_attention_distance

    teacher = tiny_model(["full", "full"], seed=3).double()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    captured = {}
    teacher.model.layers[1].attn.register_forward_pre_hook(lambda module, args: captured.update(x=args[0], inputs=args[1]))
    teacher.model.layers[1].attn.o_proj.register_forward_pre_hook(lambda module, args: captured.update(o=args[0]))
    with torch.no_grad():
        teacher(ids, use_cache=False)
        attention = teacher.model.layers[1].attn
        weights, out = _brute_force_attention(attention, captured["x"], captured["inputs"])
        assert torch.allclose(out.reshape(captured["o"].shape), captured["o"], atol=1e-10)  # the weights are the layer's own
        for skip in (0, 3):
            got = mean_attention_distance(attention, captured["x"], captured["inputs"], skip_first=skip)
            assert torch.allclose(got, _mean_distance(weights, skip), atol=1e-10)


def test_gate_bias_for_distance_gives_that_mean_look_back():
    from spikingbrain.convert.calibrate import gate_bias_for_distance

    # hand-computed: mean look-back 9 -> decay 0.9 per step -> sigmoid(b) = 0.9^16, b = log(0.9^16 / (1 - 0.9^16))
    expected = torch.tensor(0.9**16 / (1 - 0.9**16), dtype=torch.float64).log()
    assert abs(float(gate_bias_for_distance(torch.tensor([9.0]), 16)[0]) - float(expected)) < 1e-9
    model = tiny_model(["gla"], seed=4).double()
    mixer = model.model.layers[0].attn
    with torch.no_grad():
        for layer in mixer.gk_proj:
            layer.weight.zero_()
        distances = torch.tensor([3.0, 40.0])
        mixer.gate_bias.copy_(gate_bias_for_distance(distances, mixer.gate_normalizer).repeat_interleave(mixer.head_dim))
        x = torch.randn(1, 5, 32, dtype=torch.float64)
        k = torch.zeros(1, 5, mixer.num_kv_heads, mixer.head_dim, dtype=torch.float64)
        decay = mixer.log_decay(x, k).double().exp()[0, 0, :, 0]  # per kv head, through the layer's own gate
    assert torch.allclose(decay / (1 - decay), distances.double(), rtol=1e-4)  # the gate runs in fp32
    assert float(gate_bias_for_distance(torch.tensor([1e9]), 16)[0]) == 8.0  # clamped to the grid's range


def test_distance_decay_init_sets_each_kv_head_from_the_teacher():
    from spikingbrain.convert.calibrate import calibrate_gla, gate_bias_for_distance

    teacher = tiny_model(["full", "full"], seed=5).double()
    student = tiny_model(["gla", "swa"], seed=6).double()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(student.model.layers[0].attn, name).load_state_dict(getattr(teacher.model.layers[0].attn, name).state_dict())
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    captured = {}
    teacher.model.layers[0].attn.register_forward_pre_hook(lambda module, args: captured.update(x=args[0], inputs=args[1]))
    with torch.no_grad():
        teacher(ids, use_cache=False)
        weights, _ = _brute_force_attention(teacher.model.layers[0].attn, captured["x"], captured["inputs"])
    calibrate_gla(student, teacher, ids, decay_init="distance", skip_first=2)
    per_kv_head = _mean_distance(weights, 2).view(2, 2).mean(-1)
    mixer = student.model.layers[0].attn
    assert torch.allclose(mixer.gate_bias.view(2, -1), gate_bias_for_distance(per_kv_head, 16).unsqueeze(-1), atol=1e-9)
    try:
        calibrate_gla(student, teacher, ids, decay_init="teacher")
    except ValueError as err:
        assert "decay_init 'teacher'" in str(err) and "grid" in str(err)
    else:
        raise AssertionError("an unknown decay_init was accepted")


def test_multiscale_gate_bias_gives_log_spaced_half_lives():
    from spikingbrain.convert.calibrate import gate_bias_for_half_life, multiscale_gate_bias

    # hand-computed: half-life 16 with normalizer 16 -> log sigmoid(b) = -ln 2 -> sigmoid(b) = 1/2 -> b = 0
    assert abs(float(gate_bias_for_half_life(torch.tensor([16.0]), 16)[0])) < 1e-12
    model = tiny_model(["gla"], seed=7).double()
    mixer = model.model.layers[0].attn
    D = mixer.head_dim  # 8: half-lives 2 * 8192^(i / 7)
    with torch.no_grad():
        for layer in mixer.gk_proj:
            layer.weight.zero_()
        mixer.gate_bias.copy_(multiscale_gate_bias(D, mixer.gate_normalizer).repeat(mixer.num_kv_heads))
        x = torch.randn(1, 3, 32, dtype=torch.float64)
        k = torch.zeros(1, 3, mixer.num_kv_heads, D, dtype=torch.float64)
        log_decay = mixer.log_decay(x, k).double()[0, 0]  # [kv heads, D], through the layer's own gate (fp32)
    half_lives = torch.log(torch.tensor(0.5, dtype=torch.float64)) / log_decay
    expected = torch.tensor([2 * 8192 ** (i / (D - 1)) for i in range(D)], dtype=torch.float64)
    assert torch.allclose(half_lives, expected.expand_as(half_lives), rtol=1e-4)
    with pytest.raises(ValueError, match="shortest <= longest"):
        multiscale_gate_bias(D, 16, (100.0, 10.0))


def test_multiscale_decay_init_sets_every_kv_head_and_still_fits_the_norms():
    from spikingbrain.convert.calibrate import multiscale_gate_bias

    teacher = tiny_model(["full", "full"], seed=8).double()
    student = tiny_model(["gla", "gla"], seed=9).double()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    multiscale = calibrate_gla(student, teacher, ids, decay_init="multiscale")
    for i in (0, 1):
        mixer = student.model.layers[i].attn
        expected = multiscale_gate_bias(mixer.head_dim, mixer.gate_normalizer)
        assert torch.allclose(mixer.gate_bias.view(mixer.num_kv_heads, -1), expected.expand(mixer.num_kv_heads, -1), atol=1e-12)
        assert 0 < multiscale[i] <= 1 + 1e-9  # the least-squares norm never does worse than skipping the layer (error 1)
