"""llama.cpp as a further decode baseline (``bench decode --llama-cpp``).

Without llama-cpp-python (it compiles llama.cpp for minutes, so the CI install leaves it out) the benchmark must say
so and run the other models. With it, llama.cpp on the embedded teacher's own GGUF file is checked against the teacher
run by transformers from the same file (dequantized to fp32): the same next tokens on real text, logits close; and a
tiny benchmark run times it beside our model and skips the contexts its n_ctx cannot hold.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from spikingbrain.cli import main

from .test_ttft import make_pair

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (an optional baseline; it compiles for minutes)")


def test_without_llama_cpp_python_the_benchmark_says_so_and_runs_the_rest(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError, as where it is missing
    ours, _ = make_pair(tmp_path)
    out = tmp_path / "out"
    assert main(["bench", "decode", "--model", ours, "--baseline", "none", "--llama-cpp", "default", "--contexts", "16",
                 "--tokens", "2", "--repeats", "1", "--out", str(out), "--no-plot"]) == 0
    data = json.loads((out / "decode.json").read_text())
    assert list(data["candidates"]) == ["ours"]
    note = [n for n in data["notes"] if n.startswith("llama.cpp skipped")]
    assert len(note) == 1 and "pip install llama-cpp-python" in note[0]
    assert "llama.cpp skipped" in capsys.readouterr().err


def test_a_missing_gguf_file_is_named(tmp_path):
    from spikingbrain.bench.llama_cpp import LlamaCppModel

    with pytest.raises(FileNotFoundError, match="no GGUF file at .*missing.gguf"):
        LlamaCppModel(tmp_path / "missing.gguf", 64, 1)


@needs_llama_cpp
def test_llama_cpp_on_the_teachers_gguf_predicts_the_teachers_next_tokens():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spikingbrain.bench.llama_cpp import LlamaCppModel
    from spikingbrain.model.embedded import default_model_folder, gguf_path

    folder = default_model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    llama = LlamaCppModel(gguf_path(), 128, 2)
    llama.llm.reset()
    ours, theirs = [], []
    with torch.inference_mode():
        expected = teacher(ids).logits[0]
        for t in range(ids.shape[1]):
            ours.append(llama(ids[:, t : t + 1]).logits[0, 0].clone())
    got = torch.stack(ours)
    assert got.shape == expected.shape
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree >= 0.9, f"llama.cpp and transformers agree on {agree:.0%} of next tokens"
    correlation = torch.corrcoef(torch.stack([got[-1], expected[-1]]))[0, 1]
    assert correlation > 0.99
    assert tokenizer.decode(got[-1].argmax()).strip() == tokenizer.decode(expected[-1].argmax()).strip() == "Madrid"


@needs_llama_cpp
def test_a_tiny_run_times_llama_cpp_beside_ours_and_skips_what_its_context_cannot_hold(tmp_path):
    ours, _ = make_pair(tmp_path)
    out = tmp_path / "out"
    assert main(["bench", "decode", "--model", ours, "--baseline", "none", "--llama-cpp", "default", "--llama-cpp-context", "80",
                 "--contexts", "16,64,256,9000", "--tokens", "2", "--repeats", "2", "--out", str(out), "--no-plot"]) == 0
    data = json.loads((out / "decode.json").read_text())
    rows = data["candidates"]["llama_cpp"]["rows"]
    assert [r["length"] for r in rows] == [16, 64]  # 256 + 5 tokens do not fit its n_ctx
    assert [s["length"] for s in data["skipped"] if s["candidate"] == "llama_cpp"] == [256, 9000]
    # 9000 lies beyond the teacher's 8192 trained positions, but llama.cpp skips it: no note says it ran there
    assert not any(n.startswith("llama.cpp") for n in data["notes"])
    assert all(len(r["step_times_s"]) == 4 for r in rows)
    # llama.cpp's f16 KV cache: 30 layers x 2 x 3 heads x 64 x 2 bytes per position, allocated for its whole n_ctx
    # (llama.cpp rounds the 80 asked for up to its padding), which the skip names
    per_position = 30 * 2 * 3 * 64 * 2
    assert rows[0]["cache_bytes_analytic"] == 16 * per_position
    allocated = rows[0]["cache_bytes_measured"]
    assert allocated == rows[1]["cache_bytes_measured"] and allocated % per_position == 0
    n_ctx = allocated // per_position
    assert 80 <= n_ctx < 256 + 5 and all(f"n_ctx of {n_ctx}" in s["reason"] for s in data["skipped"])
