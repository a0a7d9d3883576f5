"""The reader reads a long document with flat memory: ``benchmarks/reader_memory.py`` on a tiny GLA + SWA model served as its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import make_tiny

ROOT = Path(__file__).resolve().parents[2]


def test_server_memory_stays_flat_while_a_long_document_is_read(default_folder, tmp_path):
    from spikingbrain.model.checkpoint import copy_tokenizer_files

    folder = tmp_path / "tiny-gla-swa"
    make_tiny(("gla", "swa")).save_pretrained(folder)
    copy_tokenizer_files(default_folder, folder)
    record_path = tmp_path / "memory.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "reader_memory.py"), "--model", str(folder), "--tokens", "200000", "--json", str(record_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(record_path.read_text())
    assert 190_000 < record["tokens"] < 210_000 and record["samples"][-1]["tokens_read"] == record["tokens"]
    assert sum(s["state"] == "reading" and s["tokens_read"] > record["tokens"] / 10 for s in record["samples"]) >= 3  # watched while it read
    # A model that kept every key and value would grow by the Transformer's KV cache (51 MB here) over the same tokens.
    assert record["transformer_kv_bytes"] == 2 * 2 * 2 * 8 * record["tokens"] * 4
    assert record["growth_while_reading_bytes"] < record["transformer_kv_bytes"] / 8
    assert record["state_bytes"] < 2**20 and record["document_tokens_reread"] == 0 and record["ttft_seconds"] > 0
