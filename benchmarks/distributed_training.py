"""Data-parallel conversion training: the loss curve of 1 process and of 2 ranks with the same global batch.

Fine-tunes the shipped ``spikingbrain-smollm2`` against its teacher (``default``) with a short
distillation stage (LoRA), once in this process and once on 2 ranks (gloo on loopback, each
rank on half of every global batch), and writes both curves and their largest relative
difference to ``docs/distributed-training.json``.

    .venv/bin/python benchmarks/distributed_training.py [--steps 4] [--seq-len 256] [--out docs/distributed-training.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from spikingbrain.distributed.comm import launch
from spikingbrain.distributed.training import DistributedTrainer
from spikingbrain.runtime.machine import load_average, machine_info
from spikingbrain.runtime.records import write_json
from spikingbrain.train.config import load_train_config
from spikingbrain.train.trainer import Trainer

KEYS = ("loss", "kl", "ce", "grad_norm", "ppl")


def write_config(folder: Path, steps: int, seq_len: int) -> Path:
    """A short distillation run of the shipped model (global batch 4)."""
    config = {
        "student": "spikingbrain-smollm2", "teacher": "default", "out": str(folder / "run"), "data": ["pydoc"],
        "eval_context": 256, "eval_max_tokens": 512, "eval_every": 2, "checkpoint_every": 1000, "lora_rank": 8,
        "stages": [{"name": "distill", "kind": "distill", "steps": steps, "seq_len": seq_len, "batch_size": 4,
                    "lr": 5.0e-4, "trainable": "lora"}],
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _rank(rank: int, world: int, path: str, out: str) -> None:
    config = load_train_config(path, [f"out={out}"])
    DistributedTrainer(config, progress=False).run()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default="docs/distributed-training.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write_config(folder, args.steps, args.seq_len)
        start = time.perf_counter()
        Trainer(load_train_config(str(path), [f"out={folder / 'one'}"]), progress=False).run()
        one_s = time.perf_counter() - start
        start = time.perf_counter()
        launch(_rank, 2, (str(path), str(folder / "two")), timeout_s=1200)
        two_s = time.perf_counter() - start
        curves = {name: [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()] for name in ("one", "two")}
    rows, worst = [], 0.0
    for a, b in zip(curves["one"], curves["two"]):
        row = {"step": a["step"], "stage": a["stage"]}
        for key in KEYS:
            if key in a:
                row[key] = [a[key], b[key]]
                worst = max(worst, abs(a[key] - b[key]) / max(abs(a[key]), 1e-12))
        rows.append(row)
    result = {
        "student": "spikingbrain-smollm2", "teacher": "default", "global_batch": 4, "seq_len": args.seq_len,
        "curve_one_process_vs_two_ranks": rows, "max_relative_difference": worst,
        "wall_seconds": {"one_process": one_s, "two_ranks": two_s},
        "machine": machine_info(), "load_average": load_average(),
    }
    write_json(Path(args.out), result)
    for row in rows:
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    print(f"max relative difference between the curves: {worst:.2e}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
