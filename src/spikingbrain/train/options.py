"""Names and defaults of training data and quick conversions that the command line shows, importable without torch."""

__all__ = ["TEXT_SUFFIXES", "PYDOC", "QUICK_CONVERSION_STEPS"]

#: File suffixes read as data: plain text (one document per file) and JSON lines.
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
#: The data source name of Python's own documentation (``pydoc_data.topics``).
PYDOC = "pydoc"
#: Distillation steps of a quick conversion by default (about 10 s each for SmolLM2-135M on 2 CPU cores).
QUICK_CONVERSION_STEPS = 10
