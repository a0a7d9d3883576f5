"""``spikingbrain bench ttft`` on tiny random models: JSON shape, alternation, fits on synthetic timings, bad input.

Never a timed test: the runs only check what is written, not how fast anything is.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from spikingbrain.bench.ttft import fit_cost, first_token, predict
from spikingbrain.cli import main
from spikingbrain.runtime.candidates import load_baseline


def make_pair(root, max_sequence_length=None, keep_first_tokens=0):
    """Folders of a tiny GLA + SWA SpikingBrain model and a tiny transformers Llama (both random, vocab 97)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    torch.manual_seed(0)
    ours = SpikingBrainConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, gla_chunk_size=16, streaming_chunk_size=32,
        max_sequence_length=max_sequence_length, layer_mixers=["gla", "swa"], keep_first_tokens=keep_first_tokens,
    )
    SpikingBrainForCausalLM(ours).save_pretrained(root / "ours")
    base = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=48)
    LlamaForCausalLM(base).save_pretrained(root / "base")
    return str(root / "ours"), str(root / "base")


def test_fit_recovers_known_coefficients():
    lengths = [512, 1024, 2048, 4096, 8192]
    quadratic = [0.05, 2e-4, 3e-9]
    fit = fit_cost(lengths, [predict(quadratic, n) for n in lengths], 2)
    assert fit["coefficients"] == pytest.approx(quadratic, rel=1e-6)
    linear = [0.01, 1.5e-3]
    fit = fit_cost(lengths, [linear[0] + linear[1] * n for n in lengths], 1)
    assert fit["coefficients"] == pytest.approx(linear, rel=1e-6)
    assert predict(fit["coefficients"], 1 << 20) == pytest.approx(linear[0] + linear[1] * (1 << 20), rel=1e-6)


def test_fit_never_uses_a_negative_term():
    # Concave timings (a least-squares quadratic would bend down): the fit drops the L^2 term instead.
    lengths = [1000, 2000, 4000, 8000]
    seconds = [1.0, 1.9, 3.5, 6.4]
    fit = fit_cost(lengths, seconds, 2)
    assert all(c >= 0 for c in fit["coefficients"])
    assert fit["coefficients"][2] == 0.0
    with pytest.raises(ValueError, match="at least 3"):
        fit_cost([1, 2], [1.0, 2.0], 2)


def test_first_token_is_the_greedy_choice_of_a_full_forward(tmp_path):
    _, base = make_pair(tmp_path)
    model = load_baseline(base)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = int(model(ids, use_cache=False).logits[0, -1].argmax())
        assert first_token(model, ids) == expected


def test_tiny_run_writes_json_and_plot(tmp_path, capsys):
    ours, base = make_pair(tmp_path)
    out = tmp_path / "out"
    code = main(["bench", "ttft", "--model", ours, "--baseline", base, "--lengths", "16,32,64,128",
                 "--baseline-lengths", "16,32,64", "--repeats", "2", "--extrapolate", "128,1024", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "beyond its max_position_embeddings=48" in printed.out  # the baseline at 64 tokens
    data = json.loads((out / "ttft.json").read_text())
    assert (out / "ttft.png").stat().st_size > 0
    assert data["complete"] is True and data["load_average"]["start"] is not None
    ours_rows, base_rows = data["candidates"]["ours"]["rows"], data["candidates"]["baseline"]["rows"]
    assert [r["length"] for r in ours_rows] == [16, 32, 64, 128]
    assert [r["length"] for r in base_rows] == [16, 32, 64]
    for r in ours_rows + base_rows:
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert r["median_s"] == pytest.approx(sum(r["times_s"]) / 2)
        assert r["tokens_per_s"] == pytest.approx(r["length"] / r["median_s"])
    assert [r["beyond_trained_context"] for r in base_rows] == [False, False, True]
    ratios = {r["length"]: r for r in data["ratios"]}
    assert sorted(ratios) == [16, 32, 64, 128, 1024]
    assert [ratios[n]["extrapolated"] for n in (16, 32, 64)] == [False, False, False]
    assert ratios[128]["extrapolated"] and ratios[1024]["extrapolated"]
    assert ratios[128]["ours_s"] == ours_rows[-1]["median_s"]  # ours measured, baseline from its fit
    assert not ratios[128]["ours_extrapolated"] and ratios[128]["baseline_extrapolated"]
    assert ratios[1024]["ours_extrapolated"] and ratios[1024]["baseline_extrapolated"]
    coef = data["fits"]["baseline"]["coefficients"]
    assert ratios[1024]["baseline_s"] == pytest.approx(predict(coef, 1024))
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in data["ratios"])
    assert "short_prompt_throughput" not in data["targets"]  # no 512-token run here


def test_cap_too_small_is_reported_and_results_kept(tmp_path, capsys):
    ours, _ = make_pair(tmp_path)
    out = tmp_path / "out"
    code = main(["bench", "ttft", "--model", ours, "--baseline", "none", "--lengths", "16,32", "--cap", "1e-9", "--out", str(out)])
    assert code == 1
    data = json.loads((out / "ttft.json").read_text())
    assert data["candidates"]["ours"]["rows"] == []
    assert [s["length"] for s in data["skipped"]] == [16, 32]
    assert "raise --cap" in data["skipped"][0]["reason"]
    assert "raise --cap" in capsys.readouterr().out


def test_baseline_that_cannot_load_leaves_ours(tmp_path, capsys):
    ours, _ = make_pair(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "no-such-model"}')
    out = tmp_path / "out"
    code = main(["bench", "ttft", "--model", ours, "--baseline", str(tmp_path / "broken"), "--lengths", "16,32",
                 "--repeats", "1", "--no-plot", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "baseline skipped" in err and "broken" in err and "--baseline" in err
    data = json.loads((out / "ttft.json").read_text())
    assert list(data["candidates"]) == ["ours"] and len(data["candidates"]["ours"]["rows"]) == 2


def test_length_beyond_the_configured_maximum_is_refused(tmp_path, capsys):
    ours, _ = make_pair(tmp_path, max_sequence_length=40)
    code = main(["bench", "ttft", "--model", ours, "--baseline", "none", "--lengths", "16,64", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "64" in err and "max_sequence_length=40" in err
