"""Choices and defaults of distributed runs that the command line shows, importable without torch."""

__all__ = ["DEFAULT_TIMEOUT_S", "PARALLEL_KINDS"]

#: Seconds a collective waits for the other ranks before it fails (``--timeout``).
DEFAULT_TIMEOUT_S = 300.0

#: ``--parallel`` choices: replicated (DDP) or sharded (FSDP2) data parallelism.
PARALLEL_KINDS = ("ddp", "fsdp")
