"""``spikingbrain bench decode`` on tiny random models: context caches shaped like a real prefill, JSON shape, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from spikingbrain.bench.decode import analytic_cache_bytes, cache_nbytes, context_cache
from spikingbrain.runtime.candidates import load_baseline
from spikingbrain.cli import main
from spikingbrain.model.loading import load_model

from .test_ttft import make_pair


def _shapes(cache) -> list[tuple]:
    if hasattr(cache, "layers") and hasattr(cache.layers[0], "tensors"):
        return [tuple(t.shape) for layer in cache.layers for t in layer.tensors().values()]
    return [tuple(t.shape) for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("length,keep_first", [(5, 0), (40, 0), (40, 6), (12, 6)])
def test_context_caches_have_the_shapes_of_a_real_prefill(tmp_path, length, keep_first):
    """Window 8: at 40 tokens the cache holds the window and the kept first positions; at 12 (< 8 + 6) all."""
    ours_ref, base_ref = make_pair(tmp_path, keep_first_tokens=keep_first)
    ids = torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for model in (load_model(ours_ref), load_baseline(base_ref)):
            real = model(ids, use_cache=True).cache
            made = context_cache(model, length)
            assert _shapes(made) == _shapes(real)
            assert made.get_seq_length() == real.get_seq_length() == length
            assert cache_nbytes(made) == cache_nbytes(real) == analytic_cache_bytes(model, length)


def test_tiny_run_writes_json_and_plot(tmp_path, capsys):
    ours, base = make_pair(tmp_path)
    out = tmp_path / "out"
    assert main(["bench", "decode", "--model", ours, "--baseline", base, "--contexts", "16,64,256", "--tokens", "3",
                 "--repeats", "2", "--max-kv-gib", str(50_000 / 2**30), "--out", str(out), "--also", ours]) == 0
    data = json.loads((out / "decode.json").read_text())
    # --also: a further model of ours in the same run, here ours again: the same contexts and cache bytes
    also_rows = data["candidates"]["also1"]["rows"]
    assert [(r["length"], r["cache_bytes_measured"]) for r in also_rows] == [
        (r["length"], r["cache_bytes_measured"]) for r in data["candidates"]["ours"]["rows"]]
    assert (out / "decode.png").stat().st_size > 0
    ours_rows, base_rows = data["candidates"]["ours"]["rows"], data["candidates"]["baseline"]["rows"]
    assert [r["length"] for r in ours_rows] == [16, 64, 256]
    assert [r["length"] for r in base_rows] == [16, 64]  # 256 positions need 65536 bytes > the cap
    assert data["skipped"] == [{"candidate": "baseline", "length": 256, "reason": data["skipped"][0]["reason"]}]
    assert "--max-kv-gib" in data["skipped"][0]["reason"]
    for r in ours_rows + base_rows:
        assert len(r["step_times_s"]) == 6 and r["tokens_per_s"] == pytest.approx(1 / r["median_step_s"])
    # ours: GLA state plus a window of 8 keys/values, the same from 16 tokens on; the baseline grows linearly
    assert len({r["cache_bytes_measured"] for r in ours_rows}) == 1
    assert base_rows[1]["cache_bytes_measured"] == 4 * base_rows[0]["cache_bytes_measured"]
    assert [r["length"] for r in data["comparison"]] == [16, 64]
    assert data["load_average"]["start"] is not None
    assert "baseline / ours latency" in capsys.readouterr().out


def test_decoding_bytes_show_an_fp16_window_ring(tmp_path):
    """A model whose windows decode in fp16 reports, after its steps, the ring's bytes: window layers' keys and values at
    two bytes instead of four, the GLA state unchanged; before its steps (the prefill's fp32 window) the same as fp32."""
    ours, base = make_pair(tmp_path)
    model = load_model(ours)
    model.config.window_kv_dtype = "float16"
    model.save_pretrained(tmp_path / "fp16-window")
    out = tmp_path / "out"
    assert main(["bench", "decode", "--model", ours, "--baseline", base, "--contexts", "64", "--tokens", "2", "--repeats", "1",
                 "--out", str(out), "--also", str(tmp_path / "fp16-window")]) == 0
    data = json.loads((out / "decode.json").read_text())
    fp32, fp16 = data["candidates"]["ours"]["rows"][0], data["candidates"]["also1"]["rows"][0]
    assert fp16["cache_bytes_measured"] == fp32["cache_bytes_measured"]
    # one window layer, its ring of window + 1 = 9 slots, keys and values, 2 heads of 8: two bytes less per number
    assert fp32["cache_bytes_decoding"] - fp16["cache_bytes_decoding"] == 2 * (8 + 1) * 2 * 8 * 2


def test_each_model_of_a_figure_gets_its_own_colour():
    """Ours and the baseline keep their colours; --also models take the further ones in turn, never ours or the baseline's."""
    from spikingbrain.runtime.plots import COLORS, FURTHER_COLORS, colors_of

    names = ["ours", "baseline"] + [f"also{i}" for i in range(1, len(FURTHER_COLORS) + 2)]
    colors = colors_of(names)
    assert colors["ours"] == "tab:blue" and colors["baseline"] == "tab:gray"
    assert [colors[f"also{i}"] for i in (1, 2)] == ["tab:orange", "tab:green"]
    assert colors[f"also{len(FURTHER_COLORS) + 1}"] == FURTHER_COLORS[0]  # more models than colours: the list cycles
    assert not set(FURTHER_COLORS) & set(COLORS.values())
