"""Token counts as people write them: ``"1024,4k,1M"`` in, ``"4k"`` out."""

from __future__ import annotations

__all__ = ["parse_lengths", "format_length"]

_SUFFIXES = {"k": 1024, "m": 1024 * 1024}


def parse_lengths(text: str) -> list[int]:
    """Comma-separated positive integers such as ``"1024,4k,1M"`` (``k`` = 1024, ``M`` = 1024²); ValueError otherwise."""
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = _SUFFIXES.get(part[-1], 1)
        try:
            values.append(int(part[:-1] if scale > 1 else part) * scale)
        except ValueError:
            raise ValueError(f"expected comma-separated integers like 1024,4k; got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def format_length(n: int) -> str:
    """``n`` tokens, in thousands of 1024 (``"4k"``) when it is a multiple of 1024."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)
