"""The reader page in a real headless Chromium (the system's, driven by Playwright) against ``spikingbrain serve`` on the embedded model.

``benchmarks/reader_page.py`` goes through the page as a user does: enters the API key the page
asks for, opens a meeting record, asks two questions, opens a binary file, drops a second
document and switches back, and cancels a long one while it is read. This test checks
what the page showed against the embedded model's known answers and the server's own counters.
A missing Chromium or Playwright is a failure that says how to install them, not a skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.real_model
def test_reader_page_in_chromium(default_folder, tmp_path):
    chromium = os.environ.get("SPIKINGBRAIN_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).is_file():
        pytest.fail(f"no Chromium at {chromium}: run 'scripts/install_browser.sh' as root (apt-get install chromium), as .ci/run does, or set SPIKINGBRAIN_CHROMIUM")
    if importlib.util.find_spec("playwright") is None:
        pytest.fail("playwright is not installed: pip install -e '.[test]' (make venv does it)")
    record_path, screenshot = tmp_path / "reader-page.json", tmp_path / "reader.png"
    command = [sys.executable, str(ROOT / "benchmarks" / "reader_page.py"), "--model", "default", "--api-key", "page-key", "--json", str(record_path), "--screenshot", str(screenshot)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(record_path.read_text())

    assert "API key" in record["key_prompt"] and record["models"] == ["default"]
    first, second = record["answers"]
    assert "Northern Star" in first["server_answer"]["text"] and first["server_answer"]["text"] in first["page_text"]
    assert "48,000" in second["server_answer"]["text"] and second["server_answer"]["text"] in second["page_text"]
    for answer in (first, second):  # the page says the state was kept, and the server agrees
        assert answer["page_meta"].startswith("served from kept state, 0 tokens re-read")
        assert answer["panel"]["reread"] == "0" and answer["server_answer"]["document_tokens_reread"] == 0
        assert answer["panel"]["ttft"].endswith(("ms", " s"))
    read, after = record["document_after_reading"], record["document_after_questions"]
    assert read["state"] == "ready" and read["tokens_read"] == read["tokens"] > 100
    assert after["questions"] == 2 and after["document_tokens_reread"] == 0 and after["tokens_read"] == read["tokens"]
    # the embedded model keeps every key and value: its state is a Transformer's KV cache, to the byte
    assert after["state_bytes"] == after["transformer_kv_bytes"] == 30 * 2 * 3 * 64 * read["tokens"] * 4
    assert first["panel"]["firing"] == "Spiking is off for this model."
    assert record["binary_error"].startswith("photo.jpg: looks like a binary file") and "open a .txt, .md, .html or .pdf file" in record["binary_error"]
    assert record["documents_listed"] == 1 and record["page_errors"] == []
    assert record["dropped_document_status"].startswith("agenda.md: ") and "tokens read" in record["dropped_document_status"]
    assert record["after_switching_back"]["status"].startswith("minutes.txt: ") and record["after_switching_back"]["messages"] == 4
    assert record["progress_text"].startswith("reading long.txt: ")
    assert record["documents_on_server_after_cancel"] == ["minutes.txt", "agenda.md"]
    assert record["health"]["active"] == 0 and record["health"]["cancelled"] == 1
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
