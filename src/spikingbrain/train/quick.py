"""A quick conversion of a teacher: structure, closed-form calibration and a short distillation.

``spikingbrain demo`` makes one when no trained conversion of its teacher exists (another
``--teacher``, or an installation without the shipped delta). It takes minutes on a CPU and
gives a working model that is much weaker than a full run of ``spikingbrain train`` (see
``configs/spikingbrain-smollm2.yaml``). The folder is reused when the same conversion was
finished before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..convert.converter import convert_transformer
from ..model.checkpoint import read_config
from ..model.loading import resolve_folder
from .config import StageConfig, TrainConfig
from .options import QUICK_CONVERSION_STEPS
from .trainer import Trainer

__all__ = ["quick_conversion", "quick_config", "MARKER"]

#: File that marks a folder as written by :func:`quick_conversion` (so it may be replaced).
MARKER = "quick_conversion.json"


def quick_config(teacher: str, folder: Path, distill_steps: int, seq_len: int) -> TrainConfig:
    """The training run of a quick conversion: calibrate once, then ``distill_steps`` LoRA distillation steps."""
    stages = [StageConfig(kind="calibrate", name="calibrate", steps=1, seq_len=seq_len, batch_size=2)]
    if distill_steps:
        stages.append(StageConfig(kind="distill", name="distill", steps=distill_steps, seq_len=seq_len, batch_size=1,
                                  lr=1e-3, warmup_steps=min(5, distill_steps), trainable="lora", ce_weight=0.1))
    return TrainConfig(student=str(folder / "student"), out=str(folder / "train"), teacher=str(teacher), stages=stages,
                       lora_rank=16, eval_context=seq_len, eval_max_tokens=2 * seq_len,
                       eval_every=max(1, distill_steps), checkpoint_every=max(1, distill_steps), keep_checkpoints=1)


def quick_conversion(teacher: str, folder: str | Path, distill_steps: int = QUICK_CONVERSION_STEPS, window: int = 1024,
                     seq_len: int = 1024, progress: bool = True) -> tuple[Path, dict]:
    """Convert ``teacher`` into ``folder`` and train it briefly; returns (model folder, training summary).

    The student alternates GLA and SWA layers (the 7B layout) with window ``min(window, seq_len // 2)``;
    ``seq_len`` is capped at the teacher's ``max_position_embeddings``. A folder left by an earlier
    quick conversion is reused when its settings match and replaced otherwise; any other non-empty
    folder is refused.
    """
    folder = Path(folder).expanduser()
    if distill_steps < 0:
        raise ValueError(f"distill_steps must be >= 0, got {distill_steps}")
    source = read_config(resolve_folder(teacher))
    seq_len = min(seq_len, int(source.get("max_position_embeddings") or seq_len))
    window = max(1, min(window, seq_len // 2))
    config = quick_config(teacher, folder, distill_steps, seq_len)
    settings = {"teacher": str(teacher), "window": window, "train": config.to_dict()}
    marker, summary_path = folder / MARKER, folder / "train" / "summary.json"
    if marker.is_file():
        if json.loads(marker.read_text()) == settings and summary_path.is_file():
            return folder / "train" / "final", json.loads(summary_path.read_text())
        shutil.rmtree(folder)
    elif folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder}: not empty and not a quick conversion; choose another folder or remove it")
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings, indent=1))
    convert_transformer(teacher, folder / "student", layout="alternating", sliding_window=window)
    summary = Trainer(config, progress=progress).run()
    return folder / "train" / "final", summary
