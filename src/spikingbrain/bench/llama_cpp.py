"""llama.cpp as a further decode baseline (``bench decode --llama-cpp``): a GGUF model (by default the embedded
teacher's own Q4_1 file) run by llama-cpp-python, timed in the same run as our models.

llama-cpp-python is not a dependency: it compiles llama.cpp when it installs (minutes on two cores). Where it is
missing the benchmark says so and runs without it. Unlike the transformers baseline, whose cache can be filled with
random keys and values, llama.cpp's context is filled by a real prefill of random tokens, so its contexts are capped
(by default at :data:`MAX_CONTEXT`, the embedded teacher's trained length).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

__all__ = ["LlamaCppModel", "import_llama_cpp", "is_llama_cpp", "llama_cpp_candidate", "MAX_CONTEXT"]

#: the default context cap: the embedded teacher's trained length (contexts are filled by a real prefill)
MAX_CONTEXT = 8192
INSTALL_HINT = "pip install llama-cpp-python (it compiles llama.cpp, minutes on two cores)"


def import_llama_cpp():
    """The ``llama_cpp`` module, or ImportError naming how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ImportError(f"llama.cpp baseline: llama-cpp-python could not be imported ({err}); {INSTALL_HINT}") from err
    return llama_cpp


def is_llama_cpp(model) -> bool:
    """Whether ``model`` is a :class:`LlamaCppModel`."""
    return isinstance(model, LlamaCppModel)


class LlamaCppModel:
    """A GGUF model in llama.cpp, called as a decode benchmark calls our models: ``model(ids, cache=context,
    use_cache=True)`` evaluates ``ids`` ``[1, T]`` after the tokens its context holds and returns the last position's
    logits as ``.logits`` ``[1, 1, vocab]``. The context is the model itself (llama.cpp keeps one)."""

    def __init__(self, gguf: Path, n_ctx: int, threads: int):
        gguf = Path(gguf)
        if not gguf.is_file():
            raise FileNotFoundError(f"llama.cpp baseline: no GGUF file at {gguf}; pass --llama-cpp with a .gguf path or 'default'")
        llama_cpp = import_llama_cpp()
        self._llama_cpp = llama_cpp
        self.gguf = gguf
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                   logits_all=False, verbose=False)
        meta = self.llm.metadata
        arch = meta.get("general.architecture", "llama")
        self.layers = int(meta[f"{arch}.block_count"])
        heads = int(meta[f"{arch}.attention.head_count"])
        self.kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
        self.head_dim = int(meta[f"{arch}.embedding_length"]) // heads
        self.n_ctx = self.llm.n_ctx()
        self.trained_length = int(meta[f"{arch}.context_length"]) if f"{arch}.context_length" in meta else None
        self.vocab = self.llm.n_vocab()

    def fill(self, length: int, seed: int = 0) -> "LlamaCppModel":
        """Reset the context and prefill ``length`` random tokens (a real prefill: llama.cpp's cache cannot be set)."""
        import torch

        if length >= self.n_ctx:
            raise ValueError(f"llama.cpp baseline: a context of {length} tokens does not fit its n_ctx of {self.n_ctx}")
        self.llm.reset()
        tokens = torch.randint(0, self.vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
        self.llm.eval(tokens)
        return self

    def __call__(self, input_ids, cache=None, use_cache: bool = True) -> SimpleNamespace:
        import numpy as np
        import torch

        tokens = input_ids[0].tolist()
        if self.llm.n_tokens + len(tokens) > self.n_ctx:
            raise ValueError(f"llama.cpp baseline: {self.llm.n_tokens} + {len(tokens)} tokens exceed its n_ctx of {self.n_ctx}")
        self.llm.eval(tokens)
        logits = np.ctypeslib.as_array(self._llama_cpp.llama_get_logits(self.llm.ctx), shape=(self.vocab,))
        return SimpleNamespace(logits=torch.from_numpy(logits).view(1, 1, -1))

    def kv_bytes(self, length: int) -> int:
        """Bytes of llama.cpp's default f16 KV cache for ``length`` positions."""
        return 2 * self.layers * length * self.kv_heads * self.head_dim * 2


def llama_cpp_candidate(gguf: str, n_ctx: int | None, contexts: list[int], steps: int):
    """A decode candidate for llama.cpp on ``gguf`` (``"default"``: the embedded teacher's file), with room for the
    largest of ``contexts`` up to :data:`MAX_CONTEXT` plus ``steps`` decode calls (or ``n_ctx``), on torch's thread
    count; or None and a note saying why it is skipped (llama-cpp-python missing)."""
    import torch

    from ..model.embedded import gguf_path
    from ..runtime.candidates import Candidate

    path = gguf_path() if gguf == "default" else Path(gguf)
    if n_ctx is None:
        n_ctx = max([n for n in contexts if n <= MAX_CONTEXT] or [MAX_CONTEXT]) + steps
    try:
        model = LlamaCppModel(path, n_ctx, torch.get_num_threads())
    except ImportError as err:
        return None, f"llama.cpp skipped: {err}"
    return Candidate("llama_cpp", f"llama.cpp {path.name}", model, 2, trained_length=model.trained_length), None
