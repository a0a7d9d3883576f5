"""Process groups (local loopback or ``torchrun``), counted collectives, and a launcher whose failures name every rank."""

from __future__ import annotations

import datetime
import os
import queue
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .options import DEFAULT_TIMEOUT_S

__all__ = [
    "DistributedError",
    "describe_failure",
    "Traffic",
    "all_gather_counted",
    "backend_for",
    "free_port",
    "init_from_env",
    "launch",
    "launched_by_torchrun",
]

class DistributedError(RuntimeError):
    """A distributed job failed: a rank raised, died or timed out; the message names every rank's fate."""


@dataclass
class Traffic:
    """Bytes this rank sent, in total and per kind of exchange (``gla-states``, ``swa-tail``, ``full-kv``, ...)."""

    bytes_sent: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        """Count ``nbytes`` sent for ``kind``."""
        self.bytes_sent += nbytes
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes


def all_gather_counted(tensor: torch.Tensor, traffic: Traffic, kind: str, group=None) -> list[torch.Tensor]:
    """All-gather ``tensor`` (same shape on every rank); counts the (P-1) copies a ring all-gather sends."""
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor, group=group)
    traffic.add(kind, (world - 1) * tensor.numel() * tensor.element_size())
    return out


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group ``torchrun`` describes in the environment (no-op when already joined)."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"environment variables {missing} are not set; start the command with torchrun")
    dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))


def describe_failure(err: BaseException) -> str:
    """A one-line explanation of an exception met inside a collective."""
    text = f"{type(err).__name__}: {err}".strip()
    lowered = text.lower()
    if any(s in lowered for s in ("connection closed", "connection reset", "broken pipe", "timed out", "timeout")):
        text += " (another rank stopped or stalled during a collective; see its own error)"
    return text.splitlines()[0] if len(text) < 2000 else text[:2000]


def _entry(rank: int, world: int, port: int, backend: str, timeout_s: float, worker, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        value = worker(rank, world, *args)
        results.put((rank, "ok", value))
    except BaseException as err:  # report every failure, then exit non-zero
        message = describe_failure(err)
        print(f"rank {rank} of {world}: {message}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        results.put((rank, "error", message))
        results.close()
        results.join_thread()
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(worker, nproc: int, args: tuple = (), backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
    """Run ``worker(rank, world, *args)`` in ``nproc`` new processes (forked from a server that has imported the model code) joined in one process group on loopback.

    Returns the workers' return values by rank. When any rank raises, dies or does not finish
    within ``timeout_s`` plus a grace period, raises :class:`DistributedError` listing what
    happened on every rank (the others fail their next collective, or time out).
    """
    ctx = torch.multiprocessing.get_context("forkserver")
    # The fork server imports torch and the model code once; every later rank forks from it in well under a second.
    ctx.set_forkserver_preload(["spikingbrain.distributed.prefill", "spikingbrain.distributed.training", worker.__module__])
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, nproc, port, backend, timeout_s, worker, args, results), daemon=False) for r in range(nproc)]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, object]] = {}
    deadline = None
    while len(outcome) < nproc:
        try:
            rank, status, value = results.get(timeout=0.2)
            outcome[rank] = (status, value)
            continue
        except queue.Empty:
            pass
        finished = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcome]
        if finished and deadline is None:  # a rank ended without reporting (killed, os._exit): others get timeout_s
            deadline = time.monotonic() + timeout_s + 10
        if deadline is not None and time.monotonic() > deadline:
            break
        if all(not p.is_alive() for p in procs):
            try:  # last reports may still be in the pipe
                while True:
                    rank, status, value = results.get(timeout=0.5)
                    outcome[rank] = (status, value)
            except queue.Empty:
                break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    if len(outcome) == nproc and all(status == "ok" for status, _ in outcome.values()):
        return [outcome[r][1] for r in range(nproc)]
    lines = []
    for r, p in enumerate(procs):
        if r in outcome and outcome[r][0] == "error":
            lines.append(f"rank {r}: {outcome[r][1]}")
        elif r in outcome:
            lines.append(f"rank {r}: finished")
        else:
            lines.append(f"rank {r}: ended without reporting (exit code {p.exitcode}; killed or crashed)")
    raise DistributedError(f"distributed job of {nproc} processes failed:\n  " + "\n  ".join(lines))
