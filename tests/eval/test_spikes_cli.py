"""``spikingbrain spikes`` and ``spikingbrain quantize`` on a tiny converted model with the real tokenizer.

References: the dense model's perplexity from ``eval ppl`` (spiking off must equal it), the spike
events' decoded counts (recomputed here from the model's own projection inputs by hand), and the
saved INT8 folder reloaded (its perplexity must equal what the command reported).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from reference_impl import spike_reference
from spikingbrain.cli import main
from spikingbrain.eval.perplexity import perplexity, text_token_ids
from spikingbrain.model.loading import load_model, load_tokenizer
from spikingbrain.ops.integer_attention import bf16_values_supported
from spikingbrain.spiking.events import read_events
from spikingbrain.spiking.int8 import Int8Head, Int8Linear


@pytest.fixture(scope="module")
def text(pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text("\n\n".join(p.read_text() for p in sorted(pair[2].iterdir())[:3]))
    return path


def test_spikes_report_sweep_plots_and_events(tmp_path, pair, text, capsys):
    student = str(pair[1])
    args = ["spikes", "--model", student, "--text", str(text), "--max-tokens", "160", "--context", "64",
            "--sweep-k", "2,3", "--events", str(tmp_path / "ev.npz"), "--events-tokens", "8", "--out", str(tmp_path / "r"), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(["eval", "ppl", "--model", student, "--text", str(text), "--max-tokens", "160", "--context", "64", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert report["ppl"] == pytest.approx(dense["ppl"], rel=1e-9) and report["tokens"] == dense["tokens"]
    assert report["ppl_spiking"] != report["ppl"] and math.isfinite(report["ppl_spiking"])
    layers = load_model(student).config.num_hidden_layers
    assert [entry["layer"] for entry in report["layers"]] == list(range(layers))
    assert set(report["layers"][0]["projections"]) == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "attn.gk_proj",
                                                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    overall = report["overall"]
    assert 0 < overall["sparsity_bitwise3"] < 1 and overall["counts"] > 0
    assert report["energy"]["report_45nm"]["fp16_mac_pJ"] == pytest.approx(overall["dense_macs"] * 1.5)
    assert [row["k"] for row in report["k_sweep"]] == [2.0, 3.0]
    assert report["k_sweep"][1]["ppl_ratio"] == pytest.approx(report["ppl_ratio"])  # k = 3 is the main report
    for name in ("spikes.json", "spikes-raster.png", "spikes-layers.png", "spikes-histogram.png", "spikes-k-sweep.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0

    # events: the first layer's q_proj input, recomputed by hand from the embeddings and the norm
    events = read_events(tmp_path / "ev.npz")
    stream = list(events.streams["module"]).index("model.layers.0.attn.q_proj")
    model = load_model(student)
    ids = text_token_ids(load_tokenizer(student), text.read_text(), 8)
    with torch.no_grad():
        x = model.model.layers[0].attn_norm(model.model.embeddings(ids))
    threshold = torch.clamp(x.double().abs().mean(-1) / 3, 1e-5, 1e4)
    counts = torch.floor(x.double() / threshold[:, None] + 0.5).long()
    assert torch.equal(events.counts(stream), counts)
    assert np.allclose(events.threshold(stream), threshold.numpy(), rtol=1e-6)
    assert torch.allclose(events.counts(stream) * threshold[:, None], spike_reference(x, 3))


def test_quantize_writes_a_smaller_int8_spiking_folder(tmp_path, pair, text, capsys):
    student, out = str(pair[1]), tmp_path / "w8a"
    args = ["quantize", "--model", student, "--out", str(out), "--group-size", "16", "--calibration-text", str(text),
            "--samples", "3", "--sample-tokens", "32", "--spiking-k", "3", "--eval-text", str(text), "--max-tokens", "128",
            "--context", "64", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    model = load_model(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear) and model.config.spiking["k"] == 3.0
    ids = text_token_ids(load_tokenizer(out), text.read_text(), 128)
    assert perplexity(model, ids, 64)["ppl"] == pytest.approx(result["ppl_after"], rel=1e-6)
    assert result["calibration"]["windows"] == 3 and result["file_bytes"] < result["fp32_tensor_bytes"]
    assert result["projection_size_ratio"] == pytest.approx(4 / (1 + 4 / 16))  # 1-byte codes + one fp32 scale per 16
    assert model.config.window_kv_dtype is None  # no int8 keys and values: the decode rings keep fp32
    assert main(args) == 2  # the folder exists now: refused without --force
    assert "--force" in capsys.readouterr().err
    # --int8-kv: the decode rings keep int8 codes by default (what int8_kv attends); --window-kv model keeps fp32
    for extra, dtype in ((["--int8-kv"], "int8"), (["--int8-kv", "--window-kv", "model"], None)):
        folder = tmp_path / f"kv-{dtype}"
        assert main(args[:4] + [str(folder)] + args[5:] + extra) == 0
        assert json.loads(capsys.readouterr().out).get("window_kv_dtype") == dtype
        reloaded = load_model(folder)
        assert reloaded.config.spiking["int8_kv"] and reloaded.config.window_kv_dtype == dtype
    # --attention-values bfloat16: saved in the config; the folder's attention layers sum values in bf16 where the CPU can
    folder = tmp_path / "bf16-values"
    assert main(args[:4] + [str(folder)] + args[5:] + ["--spike-query", "--int8-kv", "--attention-values", "bfloat16"]) == 0
    assert json.loads(capsys.readouterr().out)["attention_values_dtype"] == "bfloat16"
    layers = [m for m in load_model(folder).modules() if hasattr(m, "bf16_attention_values")]
    assert layers and {m.bf16_attention_values for m in layers} == {bf16_values_supported()}
    assert main(args[:4] + [str(tmp_path / "refused")] + args[5:] + ["--attention-values", "bfloat16"]) == 2
    assert "--spike-query --int8-kv" in capsys.readouterr().err


def test_quantize_w8a8_writes_a_folder_that_reloads_as_w8a8(tmp_path, pair, text, capsys):
    student, out = str(pair[1]), tmp_path / "w8a8"
    args = ["quantize", "--model", student, "--out", str(out), "--group-size", "0", "--activations", "int8",
            "--eval-text", str(text), "--max-tokens", "128", "--context", "64", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    model = load_model(out)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Int8Linear) and layer.int8_activations and model.config.spiking is None
    ids = text_token_ids(load_tokenizer(out), text.read_text(), 128)
    assert perplexity(model, ids, 64)["ppl"] == pytest.approx(result["ppl_after"], rel=1e-6)
    assert result["weight_quantization"]["activations"] == "int8"
    assert main(["quantize", "--model", student, "--out", str(tmp_path / "x"), "--activations", "int8", "--no-int8-weights"]) == 2
    assert "leave INT8 weights on" in capsys.readouterr().err
    # --lm-head: the output head too, reloaded as Int8Head
    assert main(args[:4] + [str(tmp_path / "head")] + args[5:] + ["--lm-head"]) == 0
    result = json.loads(capsys.readouterr().out)
    model = load_model(tmp_path / "head")
    assert isinstance(model.lm_head, Int8Head) and result["weight_quantization"]["lm_head"] is True
    assert perplexity(model, ids, 64)["ppl"] == pytest.approx(result["ppl_after"], rel=1e-6)
    assert main(["quantize", "--model", student, "--out", str(tmp_path / "y"), "--lm-head", "--no-int8-weights",
                 "--spiking-k", "3"]) == 2
    assert "--lm-head" in capsys.readouterr().err
    # --window-kv float16: saved in the config, the folder's window caches decode in fp16
    assert main(args[:4] + [str(tmp_path / "fp16kv")] + args[5:] + ["--window-kv", "float16"]) == 0
    assert json.loads(capsys.readouterr().out)["window_kv_dtype"] == "float16"
    model = load_model(tmp_path / "fp16kv")
    assert model.config.window_kv_dtype == "float16"
    assert {layer.step_dtype for layer in model.new_cache().layers if hasattr(layer, "step_dtype")} == {torch.float16}
