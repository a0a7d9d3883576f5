"""``spikingbrain bench efficiency`` on a tiny model folder: fields written, FLOPs from the analytical count."""

from __future__ import annotations

import json

import pytest

from spikingbrain.bench.flops import prefill_flops
from spikingbrain.cli import main
from spikingbrain.model.loading import load_model

from .test_ttft import make_pair


def test_tiny_run_writes_json_and_plot(tmp_path, capsys):
    ours, _ = make_pair(tmp_path)
    out = tmp_path / "out"
    assert main(["bench", "efficiency", "--model", ours, "--lengths", "48,96", "--repeats", "1",
                 "--peak-size", "64,64,64", "--out", str(out)]) == 0
    data = json.loads((out / "efficiency.json").read_text())
    assert (out / "efficiency.png").stat().st_size > 0
    config = load_model(ours).config
    peak = data["peak"]["gflops"]
    assert peak == max(data["peak"]["start"]["gflops"], data["peak"]["end"]["gflops"]) > 0
    assert [r["length"] for r in data["prefill"]] == [48, 96]
    for r in data["prefill"]:
        assert r["flops"] == prefill_flops(config, r["length"], logits_to_keep=1)["total"]
        assert r["gflops"] == pytest.approx(r["flops"] / r["seconds"] / 1e9)
        assert r["fraction_of_peak"] == pytest.approx(r["gflops"] / peak)
    assert data["target"]["evaluated"] is False  # no length >= 16k in a tiny run
    assert "not evaluated" in capsys.readouterr().out
