"""Where spikingbrain keeps what it builds once per machine: the embedded model's folder, shipped models, compiled
kernels."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir"]

CACHE_ENV = "SPIKINGBRAIN_CACHE"


def cache_dir() -> Path:
    """Folder for spikingbrain's caches: $SPIKINGBRAIN_CACHE, else ~/.cache/spikingbrain."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value:
        return Path(value).expanduser().absolute()
    return Path.home() / ".cache" / "spikingbrain"
