"""State snapshots: a restored cache continues exactly like the uninterrupted run; files are whole or absent."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from spikingbrain.model.checkpoint import CheckpointError
from spikingbrain.serve.snapshot import load_snapshot, save_snapshot, take_snapshot

from .conftest import make_tiny

LAYOUTS = {
    "gla-swa-full": (("gla", "swa", "full"), {}),
    "parallel-sinks": (("parallel-swa", "parallel-full", "swa"), {"num_sink_tokens": 2}),
    "gla-swa": (("gla", "swa"), {}),
}


def run(model, ids, cache):
    with torch.no_grad():
        return model(torch.tensor([ids]), cache=cache, use_cache=True).logits


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_restored_file_continues_like_the_uninterrupted_run(layout, tmp_path):
    mixers, extra = LAYOUTS[layout]
    model = make_tiny(mixers, seed=2, **extra)
    ids = torch.randint(3, 49152, (45,), generator=torch.Generator().manual_seed(0)).tolist()
    prefix, rest = ids[:30], ids[30:]
    cache = model.new_cache()
    run(model, prefix, cache)
    save_snapshot(tmp_path / "s.safetensors", take_snapshot(cache, "abc", "fp"), "tiny")
    uninterrupted = run(model, rest, cache)
    restored = load_snapshot(tmp_path / "s.safetensors", "fp").restore(model)
    assert restored.seen_tokens == 30
    continued = run(model, rest, restored)
    torch.testing.assert_close(continued, uninterrupted, atol=1e-5, rtol=0)
    # and both equal one pass over the whole sequence, with no cache at all
    with torch.no_grad():
        whole = model(torch.tensor([ids])).logits[:, 30:]
    torch.testing.assert_close(continued, whole, atol=1e-4, rtol=0)


def test_size_constant_without_full_attention_and_file_says_so(tmp_path):
    hybrid, full = make_tiny(("gla", "swa")), make_tiny(("gla", "full"))
    sizes = {}
    for name, model in (("hybrid", hybrid), ("full", full)):
        for length in (20, 80):
            cache = model.new_cache()
            run(model, list(range(3, 3 + length)), cache)
            snapshot = take_snapshot(cache, "k", "fp")
            sizes[name, length] = snapshot.nbytes
            assert snapshot.nbytes == cache.nbytes()
            save_snapshot(tmp_path / f"{name}{length}.safetensors", snapshot, name)
    assert sizes["hybrid", 20] == sizes["hybrid", 80]
    assert sizes["full", 80] > sizes["full", 20]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hybrid80.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["constant_size"] == "true" and "constant" in meta["size_note"]
    assert meta["token_count"] == "80" and meta["model"] == "hybrid" and meta["prefix_sha256"] == "k"
    with safe_open(str(tmp_path / "full80.safetensors"), "pt") as f:
        assert f.metadata()["constant_size"] == "false"


def test_wrong_model_and_corrupt_files_are_refused(tmp_path):
    model = make_tiny(("gla", "swa"))
    cache = model.new_cache()
    run(model, [5, 6, 7], cache)
    path = tmp_path / "s.safetensors"
    save_snapshot(path, take_snapshot(cache, "k", "fp-a"), "tiny")
    with pytest.raises(CheckpointError, match="made by another model"):
        load_snapshot(path, "fp-b")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_snapshot(path, "fp-a").restore(make_tiny(("swa", "gla")))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="unreadable state snapshot"):
        load_snapshot(path)


def test_sigkill_during_write_leaves_no_corrupt_entry(tmp_path):
    """A forked writer is killed between writing its temporary file and renaming it."""
    from spikingbrain.serve import snapshot

    path = tmp_path / "entry.safetensors"
    first = snapshot.Snapshot({"layers.0.state": torch.full((1, 4, 512, 512), 1.0)}, 7, "k", "fp", ["gla"], 4)
    second = snapshot.Snapshot({"layers.0.state": torch.full((1, 4, 512, 512), 2.0)}, 7, "k", "fp", ["gla"], 4)
    save_snapshot(path, first, "tiny")
    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer: its rename never comes
        def stalled_replace(source, target):
            os.write(tell, b"x")
            time.sleep(60)

        snapshot.os.replace = stalled_replace
        try:
            save_snapshot(path, second, "tiny")
        finally:
            os._exit(1)
    try:
        assert os.read(ready, 1) == b"x"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready)
        os.close(tell)
    # the entry is still the first write, whole; the second exists only as a temporary file
    values = load_snapshot(path, "fp").tensors["layers.0.state"]
    assert values.shape == (1, 4, 512, 512) and bool((values == 1.0).all())
    leftovers = list(tmp_path.glob(".entry.safetensors.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > values.numel() * 4
