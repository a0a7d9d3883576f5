"""Spike-aware fine-tuning: a distill stage with ``spiking_k`` trains the spiking student through the
straight-through estimator. Reference: the dense teacher (KL of the spiking student to it, before and after)."""

from __future__ import annotations

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from spikingbrain.model.loading import load_model
from spikingbrain.spiking.apply import spikify
from spikingbrain.train.config import load_train_config
from spikingbrain.train.trainer import Trainer
from train.test_trainer import write_config


def test_spike_aware_distillation_lowers_the_spiking_students_kl(tmp_path, pair):
    path = write_config(tmp_path / "c.yaml", pair, tmp_path / "run", steps=(4, 20), calibrate=False)
    config = yaml.safe_load(path.read_text())
    config["stages"][-1]["spiking_k"] = 3.0
    path.write_text(yaml.safe_dump(config))
    Trainer(load_train_config(path), progress=False).run()

    teacher_folder, student_folder, _ = pair
    tokenizer = AutoTokenizer.from_pretrained(student_folder)
    ids = tokenizer((tmp_path / "run" / "held_out.txt").read_text(), return_tensors="pt").input_ids[:, :256]
    final = load_model(tmp_path / "run" / "final")
    assert final.config.spiking["k"] == 3.0 and final._spike_hooks  # the saved model spikes when loaded
    before = spikify(load_model(student_folder), k=3.0)
    with torch.no_grad():
        target = AutoModelForCausalLM.from_pretrained(teacher_folder)(ids).logits.log_softmax(-1)

        def kl(model):
            logits = model(ids, use_cache=False).logits.log_softmax(-1)
            return torch.nn.functional.kl_div(logits, target, log_target=True, reduction="batchmean").item()

        assert kl(final) < kl(before)
