"""State snapshots: a restored cache continues exactly like the uninterrupted run; files are whole or absent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

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


WRITER = textwrap.dedent(
    """
    import os, sys, time, torch
    from spikingbrain.serve import snapshot
    path = os.path.join(sys.argv[1], "entry.safetensors")
    big = snapshot.Snapshot({"layers.0.state": torch.full((1, 4, 512, 512), 1.0)}, 7, "k", "fp", ["gla"], 4)
    snapshot.save_snapshot(path, big, "tiny")
    real = os.replace
    def slow_replace(a, b):  # the second write stops between the temporary file and the rename
        print("written", flush=True)
        time.sleep(60)
        real(a, b)
    snapshot.os.replace = slow_replace
    big.tensors["layers.0.state"].fill_(2.0)
    snapshot.save_snapshot(path, big, "tiny")
    """
)


def test_sigkill_during_write_leaves_no_corrupt_entry(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the entry is still the first write, whole; the second exists only as a temporary file
    values = load_snapshot(tmp_path / "entry.safetensors", "fp").tensors["layers.0.state"]
    assert values.shape == (1, 4, 512, 512) and bool((values == 1.0).all())
    leftovers = list(tmp_path.glob(".entry.safetensors.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > values.numel() * 4
