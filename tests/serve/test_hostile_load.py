"""The hostile load benchmark, short: normal answers equal to solo, every hostile request a 4xx, no 5xx, no stall."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_hostile_load_run(tiny_folder, tmp_path):
    record = tmp_path / "load.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "serve_hostile_load.py"), "--model", str(tiny_folder), "--seconds", "4", "--max-tokens", "8", "--json", str(record)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    result = json.loads(record.read_text())
    assert run.returncode == 0, run.stdout + run.stderr
    assert set(result["normal"]) == {"equal to solo"} and result["normal"]["equal to solo"] >= 4
    assert set(result["hostile"]) == {"4xx"} and result["hostile"]["4xx"] >= 4
    assert result["normal_request_correct_afterwards"] and result["failures"] == 0
    assert result["requests_tried"] == result["normal"]["equal to solo"] + result["hostile"]["4xx"]
