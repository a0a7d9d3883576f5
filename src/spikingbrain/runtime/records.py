"""JSON records of a run and the command line that made them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["write_json", "command_line"]


def write_json(path: str | Path, data: object) -> Path:
    """Write ``data`` as indented JSON to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def command_line() -> list[str]:
    """The command being run, as a user would type it (no machine path for the program)."""
    return ["spikingbrain", *sys.argv[1:]]
