"""Progress bars for long work."""

from __future__ import annotations

import sys

__all__ = ["progress"]


def progress(total: int, desc: str, disable: bool = False):
    """A tqdm progress bar on stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable, dynamic_ncols=True)
