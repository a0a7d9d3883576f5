"""A user's text files, read with errors that name the file and the fix."""

from __future__ import annotations

from pathlib import Path

__all__ = ["read_text"]


def read_text(path: str | Path) -> str:
    """A file's UTF-8 text, with an error naming the file when it is missing, binary, not UTF-8 or empty."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass an existing UTF-8 text file")
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{path}: binary content (NUL bytes); give a UTF-8 text file (.txt, .md or .jsonl)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); re-encode it as UTF-8, e.g. iconv -t UTF-8"
        ) from None
    if not text.strip():
        raise ValueError(f"{path}: the file has no text; remove it or add text")
    return text
