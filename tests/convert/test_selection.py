"""Layer selection: the costs of one-layer conversions against brute force (each converted model built in full)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from spikingbrain.convert.selection import layer_costs, plan_from_ranking, rank_layers
from spikingbrain.model.hf_import import load_transformer


def kl_to(model, teacher, ids):
    """Mean per-position KL(teacher || model), computed from scratch."""
    with torch.no_grad():
        p = F.log_softmax(teacher(ids, use_cache=False).logits.double(), -1)
        q = F.log_softmax(model(ids, use_cache=False).logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def answer_nll(model, prompt, answer):
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([prompt + answer]), use_cache=False).logits[0].double(), -1)
    return -sum(logp[len(prompt) - 1 + j, a].item() for j, a in enumerate(answer)) / len(answer)


def test_layer_costs_equal_brute_force(pair):
    teacher_folder = pair[0]
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, 49152, (2, 24), generator=gen)
    calibration = torch.randint(3, 49152, (2, 32), generator=gen)
    prompts = [(torch.randint(3, 49152, (20,), generator=gen).tolist(), [7, 99, 1234])]
    teacher = load_transformer(teacher_folder).requires_grad_(False)
    student = load_transformer(teacher_folder, ["gla"] * 4)
    costs = layer_costs(teacher, student, text, prompts, calibration)
    assert [c["layer"] for c in costs] == [0, 1, 2, 3]
    reference_nll = answer_nll(teacher, *prompts[0])
    for i in range(4):
        # brute force: a fresh conversion with GLA in layer i only, holding the calibrated GLA layer
        mixers = ["full"] * 4
        mixers[i] = "gla"
        converted = load_transformer(teacher_folder, mixers)
        converted.model.layers[i].attn.load_state_dict(student.model.layers[i].attn.state_dict())
        assert costs[i]["kl"] == pytest.approx(kl_to(converted, teacher, text), rel=1e-4, abs=1e-7)
        expected = answer_nll(converted, *prompts[0]) - reference_nll
        assert costs[i]["retrieval"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert costs[i]["kl"] > 0
    # the teacher itself is left unchanged
    assert all(type(b.attn).__name__ == "SoftmaxAttention" for b in teacher.model.layers)


def test_rank_and_plan_by_hand():
    costs = [
        {"layer": 0, "kl": 0.30, "retrieval": 0.0},  # ranks kl 3, retrieval 0 -> 3
        {"layer": 1, "kl": 0.10, "retrieval": 2.0},  # kl 1, retrieval 3 -> 4
        {"layer": 2, "kl": 0.05, "retrieval": 0.5},  # kl 0, retrieval 2 -> 2
        {"layer": 3, "kl": 0.20, "retrieval": 0.1},  # kl 2, retrieval 1 -> 3 (tie with 0: lower kl rank first)
    ]
    assert [c["layer"] for c in rank_layers(costs)] == [2, 3, 0, 1]
    ranking = rank_layers(costs)
    assert plan_from_ranking(ranking, 2) == ["swa", "swa", "gla", "gla"]
    assert plan_from_ranking(ranking, 2, full_layers=1) == ["swa", "full", "gla", "gla"]
    assert plan_from_ranking(ranking, 0, full_layers=1, parallel=True) == ["parallel-swa", "parallel-full", "parallel-swa", "parallel-swa"]
    with pytest.raises(ValueError, match="cannot plan"):
        plan_from_ranking(ranking, 4, full_layers=1)


def test_auto_layout_conversion_records_and_reuses_its_ranking(pair, tmp_path, monkeypatch):
    import json

    from spikingbrain.cli import main
    from spikingbrain.convert import selection
    from spikingbrain.convert.converter import convert_transformer

    teacher_folder = pair[0]
    report = convert_transformer(teacher_folder, tmp_path / "auto", layout="auto", linear_layers=2, auto_full_layers=1,
                                 sliding_window=16, keep_first_tokens=2, progress=False)
    assert sorted(c["layer"] for c in report.layer_ranking) == [0, 1, 2, 3]
    assert report.layer_mixers == plan_from_ranking(report.layer_ranking, 2, 1)
    assert report.layer_mixers.count("gla") == 2 and report.layer_mixers.count("full") == 1
    saved = json.loads((tmp_path / "auto" / "conversion_report.json").read_text())
    assert saved["layer_ranking"] == report.layer_ranking
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["keep_first_tokens"] == 2

    def no_measuring(*args, **kwargs):
        raise AssertionError("the ranking should have been reused")

    monkeypatch.setattr(selection, "measure_ranking", no_measuring)
    args = ["convert", str(teacher_folder), str(tmp_path / "again"), "--layout", "auto-parallel", "--auto-full-layers", "1",
            "--ranking", str(tmp_path / "auto" / "conversion_report.json"), "--parallel-combine", "residual", "--window", "16"]
    assert main(args) == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    full = [i for i, m in enumerate(report.layer_mixers) if m == "full"]
    assert again["layer_mixers"] == ["parallel-full" if i in full else "parallel-swa" for i in range(4)]
    assert again["parallel_combine"] == "residual"
    (tmp_path / "bad.json").write_text('{"layer_mixers": []}')
    assert main(["convert", str(teacher_folder), str(tmp_path / "bad"), "--layout", "auto", "--ranking", str(tmp_path / "bad.json")]) == 2
