"""lm-evaluation-harness in process on our models: ``HFLM`` wraps the loaded model object, offline.

The project ships small local tasks in ``spikingbrain/eval/tasks`` (``TASK_NAMES``): a
multiple-choice set (``spikingbrain_facts_mc``: accuracy) and a rolling log-likelihood set
(``spikingbrain_prose_rolling``: word and byte perplexity, bits per byte), both JSON-lines
files read through ``dataset_path: json``. Their ``data_files`` are made absolute before
the run, so they work from any folder.

Any other task name goes to lm-eval's own task registry (or to YAML files in
``--include-path``). The machine is offline (no dataset hub): a standard task such as
``hellaswag`` or ``wikitext`` runs only when its data is already in the Hugging Face
datasets cache, or when a task YAML of yours points ``dataset_path: json`` at local files.
The hub is switched to offline mode for the run, so a missing dataset fails at once with
lm-eval's message instead of waiting on the network.
"""

from __future__ import annotations

import copy
import json
import os
from importlib import resources
from pathlib import Path

__all__ = ["TASK_NAMES", "local_task_config", "run_harness"]

#: The local tasks shipped in spikingbrain/eval/tasks.
TASK_NAMES = ("spikingbrain_facts_mc", "spikingbrain_prose_rolling")


def _tasks_folder() -> Path:
    return Path(str(resources.files("spikingbrain") / "eval" / "tasks"))


def local_task_config(name: str) -> dict:
    """The parsed YAML of a shipped task with its ``data_files`` made absolute."""
    import yaml

    if name not in TASK_NAMES:
        raise ValueError(f"{name!r} is not a shipped task; shipped: {list(TASK_NAMES)}")
    folder = _tasks_folder()
    config = yaml.safe_load((folder / f"{name}.yaml").read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(folder / path) for split, path in files.items()}
    return config


def _plain(value):
    """``value`` with what JSON cannot hold turned into strings (lm-eval results hold a few non-JSON objects)."""
    return json.loads(json.dumps(value, default=str))


def run_harness(model, tokenizer, tasks: list[str], limit: int | float | None = None, batch_size: int = 1,
                include_path: str | None = None, num_fewshot: int | None = None, seed: int = 0) -> dict:
    """Run lm-eval ``tasks`` on a loaded causal LM (our model or any transformers model); return its ``results``.

    Returns ``results`` (per task: metric -> value, with ``_stderr`` entries), ``n_samples``
    (documents evaluated per task), the task versions and the settings.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ValueError(f"lm-evaluation-harness is not installed ({err}); pip install 'spikingbrain[bench]' or run make venv") from err

    if not tasks:
        raise ValueError(f"no tasks given; use --tasks with names like {','.join(TASK_NAMES)}")
    specs = [local_task_config(name) if name in TASK_NAMES else name for name in tasks]
    manager = TaskManager(include_path=include_path, include_defaults=False)  # indexing lm-eval's own tasks takes seconds
    others = [name for name in tasks if name not in TASK_NAMES and name not in manager.all_tasks]
    if others:
        manager = TaskManager(include_path=include_path)
    unknown = [name for name in others if name not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; shipped tasks: {list(TASK_NAMES)}; other names must be lm-eval tasks "
            "or YAML files in --include-path (see `lm-eval ls tasks`)"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    output = simple_evaluate(
        model=lm, tasks=copy.deepcopy(specs), limit=limit, num_fewshot=num_fewshot, task_manager=manager,
        log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return _plain({
        "results": output["results"],
        "n_samples": output.get("n-samples", {}),
        "versions": output.get("versions", {}),
        "settings": {"tasks": list(tasks), "limit": limit, "batch_size": batch_size, "num_fewshot": num_fewshot,
                     "prefix_token_id": lm.prefix_token_id, "max_length": lm.max_length},
    })
