"""``spikingbrain demo`` on tiny random models with the real tokenizer and short lengths: every step, report files, summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spikingbrain.demo import held_out_ids
from spikingbrain.cli import main


@pytest.fixture
def tiny_folders(tmp_path, default_folder):
    """A tiny GLA + SWA model and a tiny transformers Llama, both with the embedded model's tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
    from spikingbrain.model.checkpoint import copy_tokenizer_files

    torch.manual_seed(0)
    shapes = dict(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=192)
    SpikingBrainForCausalLM(SpikingBrainConfig(sliding_window=16, gla_chunk_size=16, streaming_chunk_size=64,
                                               layer_mixers=["gla", "swa"], **shapes)).save_pretrained(tmp_path / "ours")
    LlamaForCausalLM(LlamaConfig(**shapes)).save_pretrained(tmp_path / "teacher")
    for name in ("ours", "teacher"):
        copy_tokenizer_files(default_folder, tmp_path / name)
    return tmp_path / "ours", tmp_path / "teacher"


@pytest.mark.real_model
def test_held_out_ids_are_the_training_split(default_tokenizer):
    from spikingbrain.train.data import load_documents, split_held_out

    ids = held_out_ids(default_tokenizer, 300)
    _, held = split_held_out(load_documents(["pydoc"]), 0.1, 0)
    first = default_tokenizer(held[0].text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 300
    assert ids[: len(first)].tolist() == first[:300]


@pytest.mark.real_model
def test_tiny_demo_writes_the_report(tiny_folders, tmp_path, capsys):
    ours, teacher = tiny_folders
    out = tmp_path / "report"
    code = main(["demo", "--model", str(ours), "--teacher", str(teacher), "--out", str(out),
                 "--ttft-lengths", "64,128,256", "--baseline-lengths", "64,128,256", "--passkey-lengths", "96",
                 "--decode-contexts", "32,128", "--ppl-tokens", "200", "--ppl-context", "100", "--max-new-tokens", "3"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    data = json.loads((out / "demo.json").read_text())
    assert not data["partial"] and [s["status"] for s in data["steps"]] == ["done"] * 9
    assert data["training"] is None  # a plain folder carries no training curve
    assert set(data["perplexity"]) == {"teacher", "ours"} and data["perplexity"]["ours"]["tokens"] == 198
    assert data["passkey"]["lengths"] == [96] and set(data["passkey"]["models"]) == {"teacher", "ours"}
    assert [r["length"] for r in data["ttft"]["candidates"]["ours"]["rows"]] == [64, 128, 256]
    assert [r["length"] for r in data["decode"]["candidates"]["baseline"]["rows"]] == [32, 128]
    spiking = data["spiking"]["json"]  # k = 3 over the held-out tokens, same windows as the dense pass
    assert spiking["tokens"] == 198 and spiking["ppl"] == pytest.approx(data["perplexity"]["ours"]["ppl"], rel=1e-9)
    assert spiking["ppl_spiking"] != spiking["ppl"] and 0 < spiking["overall"]["sparsity_bitwise3"] < 1
    assert (out / "spikes" / "spikes-layers.png").stat().st_size > 0
    # 2 layers x (keys + values) x 2 heads x head_dim 8 x fp32 per position
    assert data["memory"]["1048576"]["teacher"] == 2 * 2 * 2 * 8 * 4 * 1048576
    assert data["memory"]["1048576"]["ours"] == data["memory"]["131072"]["ours"] < 10_000
    assert len(data["samples"]) == 3 and all({"teacher", "ours"} <= set(row) for row in data["samples"])
    from spikingbrain.eval.needle import is_degenerate

    flags = [row["ours"]["degenerate"] for row in data["samples"]]
    assert flags == [is_degenerate(row["ours"]["text"]) for row in data["samples"]]
    assert "degenerate sample answers (repetition)" in printed.out and f"{sum(flags)} of 3" in printed.out
    for png in ("passkey.png", "ttft/ttft.png", "decode/decode.png"):
        assert (out / png).stat().st_size > 0
    report = (out / "report.md").read_text()
    for section in ("## Summary", "## Quality", "## Time to first token", "## Decoding and memory", "## Spiking", "## Sample generations"):
        assert section in report
    assert "held-out perplexity" in printed.out and "time to first token at" in printed.out
    assert "beyond" in report  # the teacher at 256 > its 192 positions is marked


@pytest.mark.real_model
def test_demo_without_a_teacher_is_partial_but_reported(tiny_folders, tmp_path, capsys):
    ours, _ = tiny_folders
    out = tmp_path / "report"
    code = main(["demo", "--model", str(ours), "--teacher", str(tmp_path / "missing"), "--out", str(out),
                 "--ttft-lengths", "64,128", "--passkey-lengths", "96", "--decode-contexts", "32",
                 "--ppl-tokens", "120", "--ppl-context", "60", "--max-new-tokens", "2"])
    assert code == 1
    data = json.loads((out / "demo.json").read_text())
    assert data["partial"] and data["steps"][1]["status"] == "failed" and "missing" in data["steps"][1]["error"]
    assert set(data["perplexity"]) == {"ours"} and data["ttft"]["candidates"]["ours"]["rows"]
    assert "Partial results" in (out / "report.md").read_text()
    assert "loading the teacher" in capsys.readouterr().out


@pytest.mark.real_model
def test_demo_converts_a_teacher_without_a_shipped_conversion(tiny_folders, tmp_path):
    """``--model auto`` with a teacher that has no shipped conversion: a quick conversion is made, reported and reused."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from spikingbrain.model.loading import load_model
    from spikingbrain.train.quick import MARKER

    _, teacher = tiny_folders
    out = tmp_path / "report"
    args = ["demo", "--teacher", str(teacher), "--out", str(out), "--convert-steps", "3", "--ttft-lengths", "64",
            "--baseline-lengths", "64", "--passkey-lengths", "96", "--decode-contexts", "32", "--ppl-tokens", "120",
            "--ppl-context", "60", "--max-new-tokens", "2"]
    assert main(args) == 0
    data = json.loads((out / "demo.json").read_text())
    folder = out / "quick-conversion"
    assert data["steps"][0]["name"] == "convert" and all(s["status"] == "done" for s in data["steps"])
    assert data["model"] == str(folder / "train" / "final") and data["quick_conversion"]["steps"] == 4  # calibrate + 3
    summary = json.loads((folder / "train" / "summary.json").read_text())
    assert data["quick_conversion"]["ppl"] == summary["ppl"]
    ids = held_out_ids(AutoTokenizer.from_pretrained(teacher), 96)[None]
    target = torch.log_softmax(LlamaForCausalLM.from_pretrained(teacher)(ids).logits, -1)

    def kl_to_teacher(model_folder):
        logits = load_model(model_folder)(ids).logits
        return torch.nn.functional.kl_div(torch.log_softmax(logits, -1), target, log_target=True, reduction="batchmean")

    trained = load_model(folder / "train" / "final")
    assert trained.config.layer_mixers == ["gla", "swa"] and trained.config.sliding_window == 96  # seq_len 192 // 2
    assert kl_to_teacher(folder / "train" / "final") < kl_to_teacher(folder / "student")  # training moved it to the teacher
    assert "quick conversion" in (out / "report.md").read_text()
    written = [(folder / name).stat().st_mtime_ns for name in (MARKER, "train/summary.json")]
    assert main(args) == 0  # the same settings reuse the finished conversion: nothing is rewritten
    assert [(folder / name).stat().st_mtime_ns for name in (MARKER, "train/summary.json")] == written


def test_quick_conversion_refuses_a_foreign_folder(tmp_path):
    from spikingbrain.train.quick import quick_conversion

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a quick conversion"):
        quick_conversion("default", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.real_model
def test_demo_reports_a_further_model_beside_ours(tiny_folders, tmp_path, capsys):
    """``--also``: a second conversion gets its own perplexity, pass-key and sample rows, measured as ours is."""
    import shutil

    from spikingbrain.demo import also_models
    from spikingbrain.eval.perplexity import perplexity
    from spikingbrain.model.loading import load_model, load_tokenizer

    ours, teacher = tiny_folders
    other = tmp_path / "other"
    shutil.copytree(ours, other)
    torch.manual_seed(1)
    model = load_model(other)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(other)
    out = tmp_path / "report"
    code = main(["demo", "--model", str(ours), "--teacher", str(teacher), "--also", str(other), "--out", str(out),
                 "--ttft-lengths", "64", "--baseline-lengths", "64", "--passkey-lengths", "96", "--decode-contexts", "32",
                 "--ppl-tokens", "200", "--ppl-context", "100", "--max-new-tokens", "2"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    data = json.loads((out / "demo.json").read_text())
    assert data["also"] == [str(other)] and set(data["perplexity"]) == {"teacher", "ours", str(other)}
    expected = perplexity(load_model(other), held_out_ids(load_tokenizer(ours), 200), 100)["ppl"]
    assert data["perplexity"][str(other)]["ppl"] == pytest.approx(expected, rel=1e-6)
    assert data["perplexity"][str(other)]["ppl"] != data["perplexity"]["ours"]["ppl"]
    assert set(data["passkey"]["models"]) == {"teacher", "ours", str(other)}
    assert all(str(other) in row for row in data["samples"])
    assert set(data["ttft"]["candidates"]) == {"ours", "baseline"}  # speed: our main model only
    assert f"{other}: held-out perplexity" in printed.out and f"{other}: pass-key accuracy at 96" in printed.out
    # 'auto' names the shipped conversions of the teacher other than ours; 'none' is dropped by the command line
    assert also_models(["auto"], str(teacher), str(ours)) == []
    assert also_models(["auto", "x", "x"], "default", "spikingbrain-smollm2") == ["spikingbrain-smollm2-hybrid", "x"]


@pytest.mark.parametrize("name", ["spikingbrain-smollm2", "spikingbrain-smollm2-hybrid"])
def test_shipped_deltas_carry_the_curves_the_docs_show(name):
    from spikingbrain.model.shipped import shipped_training_curve

    docs = json.loads((Path(__file__).resolve().parents[1] / "docs" / f"{name}-curve.json").read_text())
    assert shipped_training_curve(name)["points"] == docs["points"]


def test_training_section_draws_the_shipped_curves(tmp_path, tiny_folders):
    from spikingbrain.demo import training_section

    names = ["spikingbrain-smollm2", "spikingbrain-smollm2-hybrid"]
    section = training_section([*names, str(tiny_folders[0])], tmp_path)  # a plain folder carries no curve
    assert list(section["models"]) == names
    for name in names:
        last = json.loads((Path(__file__).resolve().parents[1] / "docs" / f"{name}-curve.json").read_text())["points"][-1]
        assert section["models"][name]["tokens_seen"] == last["tokens_seen"]
        assert section["models"][name]["ppl_ratio"] == last["ppl_ratio"]
    assert Path(section["files"]["png"]).read_bytes()[:4] == b"\x89PNG"
    assert training_section([str(tiny_folders[0])], tmp_path) is None
