"""Sequence-parallel prefill: one prompt split into contiguous pieces across the ranks of a process group.

Every rank runs the whole model over its own piece; only the token mixers talk to the others:

- GLA (and the linear branch of parallel layers): each rank runs its piece from a zero state,
  giving its output, its final state ``S_r`` and its total log decay ``d_r`` (the sum of the
  gates over the piece). One all-gather of the ``(S_r, d_r)`` pairs lets every rank build its
  true initial state by the prefix scan ``I_{r+1} = exp(d_r) * I_r + S_r`` and add the exact
  correction ``scale * (q_t * exp(cumsum g)_t) @ I_r`` to its output. The traffic does not
  depend on the piece length.
- Sliding-window attention: each rank receives the last ``W`` rotated keys/values before its
  piece from the previous rank (point to point; a piece shorter than ``W`` forwards what it
  received), then attends as if those keys were its cache.
- Full attention: an all-gather of every piece's keys/values; each rank uses the earlier ones.

The last rank ends with the cache of the whole prompt, equal to a single-process prefill.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..model.cache import FullKV, SpikingBrainCache, WindowKV
from ..model.mixers import GatedLinearAttention, SoftmaxAttention
from ..ops import apply_rotary, prefill_gla
from .comm import Traffic, all_gather_counted, backend_for, init_from_env, launch, launched_by_torchrun
from .options import DEFAULT_TIMEOUT_S

__all__ = ["PrefillResult", "split_lengths", "sequence_parallel_prefill", "cache_tensors", "prefill_on_ranks"]


def split_lengths(total: int, parts: int) -> list[int]:
    """Lengths of ``parts`` contiguous pieces of ``total`` tokens, as equal as possible (earlier pieces longer)."""
    if parts < 1 or total < parts:
        raise ValueError(f"cannot split {total} tokens into {parts} non-empty pieces; use at most {total} ranks")
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


@dataclass
class PrefillResult:
    """One rank's outcome: ``logits`` of the last position and ``cache`` of the whole prompt (last rank only)."""

    rank: int
    tokens: int  # this rank's piece
    seconds: float
    traffic: Traffic
    logits: torch.Tensor | None = None
    cache: SpikingBrainCache | None = None
    lengths: list[int] = field(default_factory=list)


class _Exchange:
    """The sequence-parallel versions of the mixers' ``heads`` for one rank of one prefill."""

    def __init__(self, lengths: list[int], group, traffic: Traffic):
        self.lengths, self.group, self.traffic = lengths, group, traffic
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        self.starts = [sum(lengths[:i]) for i in range(len(lengths))]

    # ----- gated linear attention ---------------------------------------------------------

    def gla(self, mixer: GatedLinearAttention, x, q, k, v, inputs, cache, proj=None) -> torch.Tensor:
        """GLA over this rank's piece, corrected by the state of all earlier pieces."""
        if inputs.key_mask is not None:
            raise ValueError("sequence-parallel prefill takes one unpadded prompt (no attention_mask)")
        g = mixer.log_decay(x, k)
        q, k = mixer.feature_map(q), mixer.feature_map(k)
        sub = math.gcd(mixer.chunk_size, 16)
        o, local = prefill_gla(q, k, v, g, output_final_state=True, chunk_size=mixer.chunk_size, sub_chunk_size=sub)
        B, T, H, K = q.shape
        Hkv, V = k.shape[2], v.shape[3]
        cum = g.float().cumsum(1)  # [B, T, Hkv, K] log decay from the piece start
        pair = torch.cat((local.reshape(-1), cum[:, -1].reshape(-1)))
        gathered = all_gather_counted(pair, self.traffic, "gla-states", self.group)
        states = [p[: local.numel()].view_as(local) for p in gathered]
        decays = [p[local.numel() :].view(B, Hkv, K, 1) for p in gathered]
        initial = torch.zeros_like(local)
        for j in range(self.rank):
            initial = decays[j].exp() * initial + states[j]
        if self.rank:
            qd = (q.float() * K**-0.5).view(B, T, Hkv, H // Hkv, K) * cum.exp().unsqueeze(3)
            o = o + torch.einsum("bthgk,bhkv->bthgv", qd, initial).reshape(B, T, H, V).to(o.dtype)
        if cache is not None:
            final = initial
            for j in range(self.rank, len(states)):
                final = decays[j].exp() * final + states[j]
            cache.state = final
        return mixer.g_norm(o)

    # ----- softmax attention --------------------------------------------------------------

    def _previous_window(self, keys: torch.Tensor, values: torch.Tensor, window: int) -> torch.Tensor | None:
        """The last ``window`` keys/values ``[2, B, n, Hkv, D]`` before this piece, passed along the ranks."""
        own = torch.stack((keys, values))
        before = min(window, self.starts[self.rank])
        last = self.rank == len(self.lengths) - 1
        after = 0 if last else min(window, self.starts[self.rank + 1])
        pending = None
        if not last and own.shape[2] >= after:  # our own tail is all the next rank needs: send at once
            outgoing = own[:, :, own.shape[2] - after :].contiguous()
            pending = dist.isend(outgoing, self.ranks[self.rank + 1], group=self.group)
            self.traffic.add("swa-tail", outgoing.numel() * outgoing.element_size())
        received = None
        if before:
            received = own.new_empty(2, own.shape[1], before, *own.shape[3:])
            dist.recv(received, self.ranks[self.rank - 1], group=self.group)
        if not last and pending is None:  # a short piece: forward the tail it received, plus itself
            joined = own if received is None else torch.cat((received, own), 2)
            outgoing = joined[:, :, joined.shape[2] - after :].contiguous()
            pending = dist.isend(outgoing, self.ranks[self.rank + 1], group=self.group)
            self.traffic.add("swa-tail", outgoing.numel() * outgoing.element_size())
        if pending is not None:
            pending.wait()
        return received

    def _previous_all(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
        """All keys/values ``[2, B, n, Hkv, D]`` before this piece (all-gather, padded to the longest piece)."""
        own = torch.stack((keys, values))
        longest = max(self.lengths)
        padded = torch.nn.functional.pad(own, (0, 0, 0, 0, 0, longest - own.shape[2]))
        gathered = all_gather_counted(padded, self.traffic, "full-kv", self.group)
        earlier = [gathered[j][:, :, : self.lengths[j]] for j in range(self.rank)]
        return torch.cat(earlier, 2) if earlier else None

    def softmax(self, mixer: SoftmaxAttention, x, q, k, v, inputs, cache, proj) -> torch.Tensor:
        """Sliding-window or full attention over this piece, with the earlier keys it needs as its cache."""
        rotated = apply_rotary(k, inputs.cos, inputs.sin)
        if mixer.window is None:
            earlier = self._previous_all(rotated, v)
            cache = FullKV() if cache is None else cache
            if mixer.sinks is not None:
                cache.set_sinks(*mixer.sink_keys_values(proj))
            if earlier is not None:
                cache.extend(earlier[0], earlier[1])
        else:
            earlier = self._previous_window(rotated, v, mixer.window)
            cache = WindowKV(mixer.window) if cache is None else cache
            if earlier is not None:
                cache.keys, cache.values = earlier[0].contiguous(), earlier[1].contiguous()
        return SoftmaxAttention.heads(mixer, x, q, k, v, inputs, cache, proj)


@contextlib.contextmanager
def _sequence_parallel_mixers(model: torch.nn.Module, exchange: _Exchange):
    """Route every mixer's ``heads`` of ``model`` through ``exchange`` while the block runs."""
    patched = []
    for module in model.modules():
        if isinstance(module, GatedLinearAttention):
            module.heads = functools.partial(exchange.gla, module)
        elif isinstance(module, SoftmaxAttention):
            module.heads = functools.partial(exchange.softmax, module)
        else:
            continue
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.heads


def sequence_parallel_prefill(model, ids: torch.Tensor, lengths: list[int] | None = None, group=None) -> PrefillResult:
    """Prefill ``ids`` ``[B, T]`` (the whole prompt, on every rank) split over the ranks of ``group``.

    ``lengths`` gives each rank's piece (default: as equal as possible). Every rank of the
    group must call this with the same ``ids`` and ``lengths``. The last rank's result holds
    the last position's logits and the cache of the whole prompt.
    """
    if model.config.keep_first_tokens:
        raise ValueError(
            f"sequence-parallel prefill does not support keep_first_tokens={model.config.keep_first_tokens} yet "
            "(the first tokens live on rank 0 only); prefill on one process"
        )
    if model.config.gla_update != "additive":
        raise ValueError(
            f"sequence-parallel prefill does not support gla_update={model.config.gla_update!r} "
            "(its pieces combine GLA states by their decays only); prefill on one process"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    lengths = split_lengths(ids.shape[1], world) if lengths is None else list(lengths)
    if len(lengths) != world or sum(lengths) != ids.shape[1] or min(lengths) < 1:
        raise ValueError(f"piece lengths {lengths} must be {world} positive numbers adding up to the prompt's {ids.shape[1]} tokens")
    traffic = Traffic()
    exchange = _Exchange(lengths, group, traffic)
    start = exchange.starts[rank]
    piece = ids[:, start : start + lengths[rank]].to(model.device)
    cache = model.new_cache()
    cache.seen_tokens = start
    dist.barrier(group=group)
    t0 = time.perf_counter()
    with torch.no_grad(), _sequence_parallel_mixers(model, exchange):
        hidden = model.model(input_ids=piece, cache=cache, use_cache=True).last_hidden_state
        logits = model.lm_head(hidden[:, -1:]).float()
    seconds = time.perf_counter() - t0
    last = rank == world - 1
    return PrefillResult(
        rank=rank, tokens=lengths[rank], seconds=seconds, traffic=traffic,
        logits=logits if last else None, cache=cache if last else None, lengths=lengths,
    )


def cache_tensors(cache: SpikingBrainCache) -> dict[str, torch.Tensor]:
    """The cache's tensors by name (``layers.N.<entry>``), contiguous on the CPU, for a safetensors file."""
    return {
        f"layers.{i}.{name}": t.detach().cpu().contiguous()
        for i, layer in enumerate(cache.layers)
        for name, t in layer.tensors().items()
    }


def _device_for(name: str, local_rank: int) -> torch.device:
    """``auto``: this rank's GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def _write_output(path: Path, result: PrefillResult) -> None:
    """The last position's logits and the final cache as one safetensors file, replaced atomically."""
    from safetensors.torch import save_file

    tensors = {"logits": result.logits[:, -1].cpu().contiguous(), **cache_tensors(result.cache)}
    meta = {"tokens": str(result.cache.seen_tokens), "layer_mixers": json.dumps(result.cache.layer_mixers)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(partial), metadata=meta)
    partial.replace(path)


def _prefill_worker(rank: int, world: int, model_ref: str, text_path: str, out: str, device_name: str) -> dict:
    """One rank of ``spikingbrain prefill``: tokenise, prefill its piece, the last rank writes ``out``."""
    from ..model.loading import load_model, load_tokenizer

    device = _device_for(device_name, int(os.environ.get("LOCAL_RANK", rank)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    text = Path(text_path).read_text()
    ids = load_tokenizer(model_ref)(text, return_tensors="pt").input_ids
    model = load_model(model_ref, device=device)
    result = sequence_parallel_prefill(model, ids)
    if result.logits is not None:
        _write_output(Path(out), result)
    return {
        "rank": rank, "tokens": result.tokens, "seconds": round(result.seconds, 4),
        "bytes_sent": result.traffic.bytes_sent, "bytes_by_kind": result.traffic.by_kind,
    }


def prefill_on_ranks(model_ref: str, text_path: str | Path, out: str | Path, device: str = "cpu", nproc: int = 2,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> dict | None:
    """Prefill the text of ``text_path`` over ``nproc`` local ranks (or ``torchrun``'s group) and write ``out``.

    Returns the report (tokens, ranks, seconds, per-rank traffic) on the process that reports: the
    caller of a local launch, or the last rank (which wrote the file) under ``torchrun``; None on the others.
    """
    work = (str(model_ref), str(text_path), str(Path(out).expanduser()), device)
    if launched_by_torchrun():
        init_from_env(_device_for(device, 0), timeout_s)
        try:
            mine = _prefill_worker(dist.get_rank(), dist.get_world_size(), *work)
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        finally:
            dist.destroy_process_group()
        if mine["rank"] != len(ranks) - 1:
            return None
    else:
        if nproc < 1:
            raise ValueError(f"--nproc {nproc}: needs at least 1 process")
        backend = backend_for(_device_for(device, 0))
        ranks = launch(_prefill_worker, nproc, work, backend=backend, timeout_s=timeout_s)
    return {
        "tokens": sum(r["tokens"] for r in ranks), "ranks": len(ranks),
        "seconds": max(r["seconds"] for r in ranks), "out": work[2], "per_rank": ranks,
    }
