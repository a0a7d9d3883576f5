"""Small C kernels shipped as source (``ops/kernels/*.c``), compiled once per machine with the system's C compiler and
loaded with ``ctypes``.

A kernel is built into ``cache_dir()/kernels`` under a name that hashes its source, the compiler and the flags, so
an edited source or another compiler builds anew; a build is written to a temporary name and renamed, so concurrent
processes never load half a file. Where no compiler works (``$CC``, else ``cc``), :func:`load_kernel` warns once and
returns None, and callers keep their PyTorch path. ctypes releases the GIL during a call. The kernels split their
loops over one worker pool (``kernels/thread_pool.c``), built first as its own library and linked into each of them,
so that a process has one pool whichever kernels it loads."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from .files import cache_dir

__all__ = ["KERNEL_FLAGS", "load_kernel", "kernel_source"]

#: -ffp-contract=off: no fused multiply-adds, so fp32 results round as PyTorch's separate multiplies and adds do
KERNEL_FLAGS = ("-O3", "-ffp-contract=off", "-pthread", "-shared", "-fPIC")

#: the library every other kernel links against (one worker pool per process)
POOL = "thread_pool"


def kernel_source(name: str) -> Path:
    """The C source of kernel ``name``."""
    return Path(__file__).with_name("kernels") / f"{name}.c"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "").strip() or "cc")


def _compiler_identity(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout


@functools.cache
def load_kernel(name: str) -> ctypes.CDLL | None:
    """Kernel ``name`` as a loaded library, built on first use (about a second); None where it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        warnings.warn(f"no C compiler (set CC, or install gcc): the {name} kernel is off and PyTorch computes instead", stacklevel=2)
        return None
    libraries = ()
    if name != POOL:  # every other kernel links against the pool, built first
        pool = _build(POOL, compiler, (), name)
        if pool is None:
            return None
        libraries = (str(pool),)
    target = _build(name, compiler, libraries, name)
    return None if target is None else ctypes.CDLL(str(target))


def _build(name: str, compiler: str, libraries: tuple[str, ...], wanted: str) -> Path | None:
    """The built library of kernel ``name`` (linked against ``libraries``), compiled where no build of this source,
    headers, compiler and flags exists yet; None, with a warning naming the ``wanted`` kernel, where the compiler fails."""
    source = kernel_source(name)
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(source.read_bytes() + headers + _compiler_identity(compiler).encode() + " ".join(KERNEL_FLAGS + libraries).encode())
    folder = cache_dir() / "kernels"
    target = folder / f"{name}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        command = [compiler, *KERNEL_FLAGS, f"-I{source.parent}", str(source), *libraries, "-o", tmp, "-lm"]
        built = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if built.returncode != 0:
            warnings.warn(f"building the {wanted} kernel from {source} failed ({compiler}): {built.stderr.strip()[-800:]}; "
                          "PyTorch computes instead", stacklevel=3)
            return None
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
