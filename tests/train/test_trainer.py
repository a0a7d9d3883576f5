"""Conversion training: losses fall, a killed run resumes onto the same curve, configs and checkpoints fail clearly.

Teacher: a tiny random Llama saved by transformers, with the embedded model's real tokenizer;
student: its `convert` (GLA/SWA alternating). References: the uninterrupted run for resume,
the loss at the start for learning, and hand-written configs for the errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from spikingbrain.cli import main
from spikingbrain.model.shipped import build_from_delta, read_delta, write_delta
from spikingbrain.train.config import load_train_config
from spikingbrain.train.trainer import Trainer, TrainingError

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, pair, out: Path, steps=(6, 6), calibrate=True, **extra) -> Path:
    teacher, student, data = pair
    config = {
        "student": str(student), "teacher": str(teacher), "out": str(out), "data": [str(data)],
        "held_out_fraction": 0.2, "eval_context": 64, "eval_max_tokens": 256, "eval_every": 1000,
        "checkpoint_every": 2, "lora_rank": 4, "threads": 1,
        "stages": [
            {"name": "calibrate", "kind": "calibrate", "steps": 1, "seq_len": 64, "batch_size": 2},
            {"name": "transfer", "kind": "transfer", "steps": steps[0], "seq_len": 32, "batch_size": 2, "lr": 3e-3, "trainable": "lora"},
            {"name": "distill", "kind": "distill", "steps": steps[1], "seq_len": 48, "batch_size": 2, "lr": 3e-3, "trainable": "lora", "grad_accum": 2},
        ],
        **extra,
    }
    if not calibrate:
        config["stages"] = config["stages"][1:]
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def curve(out: Path) -> list[tuple]:
    keys = ("step", "stage", "loss", "mse", "kl", "ce", "lr", "tokens_seen", "ppl")
    return [tuple(r.get(k) for k in keys) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_training_lowers_the_losses(tmp_path, pair):
    # no calibration here: transfer itself must bring the converted mixers towards the teacher
    config = load_train_config(write_config(tmp_path / "c.yaml", pair, tmp_path / "run", steps=(12, 24), calibrate=False))
    summary = Trainer(config, progress=False).run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    transfer = [r["mse"] for r in records if r["stage"] == "transfer"]
    assert sum(transfer[-4:]) < 0.9 * sum(transfer[:4])  # batches differ: compare means
    # the distillation objective on text training never saw: KL(teacher || student) before and after
    teacher_folder, student_folder, data = pair
    tokenizer = AutoTokenizer.from_pretrained(student_folder)
    ids = tokenizer((tmp_path / "run" / "held_out.txt").read_text(), return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        target = AutoModelForCausalLM.from_pretrained(teacher_folder)(ids).logits.log_softmax(-1)
        def kl(folder):
            logits = AutoModelForCausalLM.from_pretrained(folder)(ids, use_cache=False).logits.log_softmax(-1)
            return torch.nn.functional.kl_div(logits, target, log_target=True, reduction="batchmean").item()
        assert kl(tmp_path / "run" / "final") < kl(student_folder)
        # the compact delta rebuilds the trained model from the teacher alone (LoRA factors stored in bf16)
        build_from_delta(tmp_path / "run" / "delta.safetensors", tmp_path / "rebuilt")
        final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")(ids, use_cache=False).logits
        rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt")(ids, use_cache=False).logits
        assert (rebuilt - final).abs().max() < 1e-2 * final.abs().max()
        assert (rebuilt - final).abs().max() < 0.1 * (final - AutoModelForCausalLM.from_pretrained(student_folder)(ids, use_cache=False).logits).abs().max()
    assert records[0]["stage"] == "converted" and records[0]["tokens_seen"] == 0
    assert summary["tokens_seen"] == 12 * 2 * 32 + 24 * 2 * 2 * 48
    assert records[-1]["fraction_of_teacher_pretraining"] == pytest.approx(summary["tokens_seen"] / 2e12)
    assert (tmp_path / "run" / "held_out.txt").read_text().strip()
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [r["step"] for r in records if "ppl_ratio" in r] == [0, 12, 36]
    assert (tmp_path / "run" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    with safe_open(str(tmp_path / "run" / "delta.safetensors"), framework="pt") as f:  # the delta carries the curve
        carried = json.loads(f.metadata()["training_curve"])
    assert [(p["step"], p["ppl"]) for p in carried["points"]] == [(r["step"], r["ppl"]) for r in records if "ppl_ratio" in r]
    assert summary["ppl"] == records[-1]["ppl"]  # the final evaluation is the last step's


def test_killed_run_resumes_onto_the_same_curve(tmp_path, pair):
    steps = (30, 30)
    reference = tmp_path / "reference"
    Trainer(load_train_config(write_config(tmp_path / "a.yaml", pair, reference, steps=steps)), progress=False).run()

    killed = tmp_path / "killed"
    cfg = write_config(tmp_path / "b.yaml", pair, killed, steps=steps)
    command = [sys.executable, "-m", "spikingbrain.cli", "train", str(cfg), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-12" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"
    done = sorted(int(p.name[5:]) for p in (killed / "checkpoints").glob("step-*"))
    assert done and max(done) < sum(steps) + 1

    assert main(["train", str(cfg), "--resume", "--no-progress"]) == 0
    assert curve(killed) == curve(reference)
    assert json.loads((killed / "summary.json").read_text())["ppl"] == json.loads((reference / "summary.json").read_text())["ppl"]


def test_config_and_checkpoint_errors(tmp_path, pair, capsys):
    cfg = write_config(tmp_path / "c.yaml", pair, tmp_path / "run")
    text = cfg.read_text()
    (tmp_path / "unknown.yaml").write_text(text + "learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rate'\]"):
        load_train_config(tmp_path / "unknown.yaml")
    with pytest.raises(ValueError, match="stages.0.kind|stages\\[0\\].kind"):
        load_train_config(cfg, ["stages.0.kind=finetune"])
    with pytest.raises(ValueError, match="seed = 'abc': expected int"):
        load_train_config(cfg, ["seed=abc"])
    with pytest.raises(ValueError, match=r"stages\[0\].decay_init='teacher'; use one of \['grid', 'distance', 'multiscale'\]"):
        load_train_config(cfg, ["stages.0.decay_init=teacher"])
    with pytest.raises(ValueError, match=r"stages\[1\].decay_init='multiscale' is read by calibrate stages only"):
        load_train_config(cfg, ["stages.1.decay_init=multiscale"])
    with pytest.raises(ValueError, match="'nope' does not exist"):
        load_train_config(cfg, ["nope.lr=1"])
    with pytest.raises(ValueError, match="config file not found"):
        load_train_config(tmp_path / "missing.yaml")
    toml = tmp_path / "c.toml"
    toml.write_text('student = "s"\nout = "o"\n[[stages]]\nkind = "distill"\nsteps = 2\nlr = "fast"\n')
    with pytest.raises(ValueError, match="lr = 'fast': expected float"):
        load_train_config(toml)
    # a data file with no text stops the run before any training
    (tmp_path / "empty.txt").write_text("")
    assert main(["train", str(cfg), "--set", f"data=[{tmp_path / 'empty.txt'}]", "--out", str(tmp_path / "e")]) == 2
    assert "empty.txt" in capsys.readouterr().err
    # checkpoints of another run are refused, naming what differs
    Trainer(load_train_config(cfg, ["stages.1.steps=2", "stages.2.steps=2"]), progress=False).run()
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        Trainer(load_train_config(cfg, ["stages.1.steps=2", "stages.2.steps=2"]), progress=False)
    with pytest.raises(TrainingError, match=r"another run \(config differs in \['seed'\]\)"):
        Trainer(load_train_config(cfg, ["stages.1.steps=2", "stages.2.steps=2", "seed=1"]), resume=True, progress=False).run()
    # the checkpoint is in the last stage: changing that stage is refused, adding a stage after it is not
    with pytest.raises(TrainingError, match=r"config differs in \['stages'\]"):
        Trainer(load_train_config(cfg, ["stages.1.steps=2", "stages.2.steps=3"]), resume=True, progress=False).run()
    extended = load_train_config(cfg, ["stages.1.steps=2", "stages.2.steps=2"])
    extended.stages.append(dataclasses.replace(extended.stages[2], name="distill-more", steps=1))
    summary = Trainer(extended, resume=True, progress=False).run()
    assert summary["steps"] == 1 + 2 + 2 + 1


def test_a_checkpoint_at_the_end_of_a_stage_resumes_into_the_next_even_if_that_stages_data_changed(tmp_path, pair):
    # nothing of a finished stage is restored, so its rows may change (more text, another packing) without harm
    teacher, student, data = pair
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(p.read_text() for p in sorted(Path(data).iterdir())[:3]))
    cfg = write_config(tmp_path / "c.yaml", (teacher, student, text), tmp_path / "run", calibrate=False)
    first = load_train_config(cfg, ["stages.0.steps=2", "stages.1.steps=2"])
    Trainer(first, progress=False).run()
    text.write_text(text.read_text() * 2)  # the distill stage's rows are now twice as many
    extended = load_train_config(cfg, ["stages.0.steps=2", "stages.1.steps=2"])
    extended.stages.append(dataclasses.replace(extended.stages[1], name="distill-more", steps=1))
    assert Trainer(extended, resume=True, progress=False).run()["steps"] == 5
    stages = [json.loads(line)["stage"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert stages[-1] == "distill-more" and stages.count("distill-more") == 1


def test_new_parameters_train_at_their_own_learning_rate(tmp_path, pair):
    # Adam's first step moves every weight by lr * g / (|g| + eps): by the group's lr wherever the gradient is not tiny
    cfg = write_config(tmp_path / "c.yaml", pair, tmp_path / "run", calibrate=False, checkpoint_every=1)
    config = load_train_config(cfg, ["stages.0.steps=1", "stages.1.steps=1", "stages.1.new_lr_scale=10",
                                     "stages.1.grad_accum=1", "stages.1.lr=1e-3"])
    config.stages = config.stages[1:]
    trainer = Trainer(config, progress=False)
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    trainer.run()
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step-1" / "trained.safetensors"))
    new = trainer._new_parameter_names()
    moves = {n: (t - before[n]).abs().max().item() for n, t in trained.items()}
    moved = {n: m for n, m in moves.items() if m > 0}  # LoRA's A factors get no gradient while B is still zero
    assert any(n in new for n in moved) and any(n not in new for n in moved)
    for name, move in moved.items():
        assert move == pytest.approx(1e-2 if name in new else 1e-3, rel=1e-3), name


def test_checkpoint_from_before_a_new_config_key_resumes(tmp_path, pair):
    # a key added with its default (here new_lr_scale) must not orphan checkpoints written without it
    cfg = write_config(tmp_path / "c.yaml", pair, tmp_path / "run", steps=(2, 2))
    config = load_train_config(cfg)
    Trainer(config, progress=False).run()
    state_path = tmp_path / "run" / "checkpoints" / "step-5" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    # the fingerprint as the trainer wrote it before: every field but the bookkeeping ones, without the newer keys
    old = config.to_dict()
    for key in ("out", "checkpoint_every", "keep_checkpoints", "eval_every", "threads", "device",
                "eval_passkey_lengths", "eval_passkey_trials"):
        del old[key]
    for stage in old["stages"]:
        del stage["new_lr_scale"]
    state["fingerprint"] = json.dumps(old)
    state_path.write_text(json.dumps(state))
    extended = load_train_config(cfg, ["stages.1.steps=2", "stages.2.steps=2"])
    extended.stages.append(dataclasses.replace(extended.stages[2], name="more", steps=1))
    assert Trainer(extended, resume=True, progress=False).run()["steps"] == 6
    # while a real difference in that key is still refused
    state["fingerprint"] = json.dumps({**old, "stages": [{**s, "new_lr_scale": 3.0} for s in old["stages"]]})
    state_path.write_text(json.dumps(state))
    (tmp_path / "run" / "checkpoints" / "step-6").rename(tmp_path / "step-6-away")
    with pytest.raises(TrainingError, match=r"config differs in \['stages'\]"):
        Trainer(extended, resume=True, progress=False).run()


def test_pass_key_curve_is_logged_and_drawn(tmp_path, pair):
    from spikingbrain.eval.passkey import run_passkey
    from spikingbrain.train.trainer import PASSKEY_DEPTHS

    cfg = write_config(tmp_path / "c.yaml", pair, tmp_path / "run", steps=(2, 2), eval_passkey_lengths=[96, 160],
                       eval_passkey_trials=1)
    trainer = Trainer(load_train_config(cfg), progress=False)
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "ppl_ratio" in r]
    assert all(set(r["passkey"]) == {"96", "160"} for r in evaluated)
    # the last evaluation is the final student's: recompute it independently from the saved folder
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    again = run_passkey({"final": final}, trainer.tokenizer, [96, 160], PASSKEY_DEPTHS, trials=1, seed=0)
    assert evaluated[-1]["passkey"] == again["models"]["final"]["accuracy_by_length"]
    teacher = AutoModelForCausalLM.from_pretrained(pair[0]).eval()
    expected_teacher = run_passkey({"t": teacher}, trainer.tokenizer, [96, 160], PASSKEY_DEPTHS, trials=1, seed=0)
    assert records[0]["teacher_passkey"] == expected_teacher["models"]["t"]["accuracy_by_length"]
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert curve["teacher_passkey"] == records[0]["teacher_passkey"]
    assert [p["passkey"] for p in curve["points"]] == [r["passkey"] for r in evaluated]


def write_code_word_chats(path: Path, count: int = 40) -> Path:
    """A JSONL file of ``count`` one-turn chat examples (a code word in the prompt, asked back)."""
    path.write_text("".join(json.dumps({"prompt": f"Note {i}: the code word is lantern-{i}. What is the code word?",
                                        "answer": f"The code word is lantern-{i}."}) + "\n" for i in range(count)))
    return path


def test_chat_examples_train_on_their_answers_only(tmp_path, pair):
    # data: plain text plus chat examples; the first distill step's logged loss must be the loss over plain text
    # and the answers only, recomputed here from the same batch and a hand-built mask
    import copy

    from spikingbrain.train.data import PackedBatches, encode_chat_example, pack, row_fitting_order
    from spikingbrain.train.trainer import distill_loss

    teacher, student, _ = pair
    chats = write_code_word_chats(tmp_path / "chats.jsonl")
    cfg = write_config(tmp_path / "c.yaml", (teacher, student, chats), tmp_path / "run", calibrate=False,
                       held_out_fraction=0.1)
    plain = tmp_path / "plain.txt"
    plain.write_text("The river keeps moving past the old mill, and the lamps are lit one by one. " * 12)
    config = load_train_config(cfg, ["stages.0.steps=1", "stages.1.steps=1", "stages.1.grad_accum=1", "stages.1.seq_len=256",
                                     f"data=[{plain}, {chats}]", "held_out_fraction=0.05"])
    config.stages = config.stages[1:]
    trainer = Trainer(config, progress=False)
    assert trainer.train_masks is not None and sum(m is not None for m in trainer.train_masks) > 30
    untrained = copy.deepcopy(trainer.student)
    trainer.run()
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    stage = config.stages[0]
    order = row_fitting_order(trainer.train_tokens, trainer.train_masks, stage.seq_len)  # checked by hand in test_data
    tokens, masks = [trainer.train_tokens[i] for i in order], [trainer.train_masks[i] for i in order]
    rows = pack(tokens, stage.seq_len, trainer.separator)
    batch = next(PackedBatches(rows, stage.batch_size, seed=config.seed))
    # the mask by hand: walk the same stream, scoring plain text and the answers of chat examples inside one row
    flat_mask, position = [], 0
    for ids, mask in zip(tokens, masks):
        if mask is None:
            flat_mask += [True] * (len(ids) + 1)
        else:
            fits = position // stage.seq_len == (position + len(ids) - 1) // stage.seq_len
            flat_mask += [m and fits for m in mask] + [False]
        position += len(ids) + 1
    mask_rows = torch.tensor(flat_mask[: rows.numel()]).view(rows.shape)
    index = [next(i for i in range(len(rows)) if torch.equal(rows[i], row)) for row in batch]
    mask = mask_rows[index]
    assert 0 < mask.sum() < mask.numel()  # the batch holds both kinds
    with torch.no_grad():
        expected, _ = distill_loss(untrained, trainer.teacher, batch, stage.kl_weight, stage.ce_weight, loss_mask=mask)
        unmasked, _ = distill_loss(untrained, trainer.teacher, batch, stage.kl_weight, stage.ce_weight)
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert logged["loss"] != pytest.approx(unmasked.item(), rel=1e-3)
    # what the mask scores in a chat example is its answer (and end-of-turn token)
    chat_doc = next(i for i, m in enumerate(trainer.train_masks) if m is not None)
    ids, answer_mask = trainer.train_tokens[chat_doc], trainer.train_masks[chat_doc]
    answer = trainer.tokenizer.decode([t for t, m in zip(ids, answer_mask) if m])
    assert answer.startswith("The code word is lantern-") and answer.endswith("<|im_end|>")
    assert (ids, answer_mask) == encode_chat_example(trainer.tokenizer, *_prompt_and_answer(trainer.tokenizer.decode(ids)))


def test_chat_loss_all_scores_every_token_of_a_chat_example(tmp_path, pair):
    # chat_loss: all trains on the whole chat template, like plain text: the first step's logged loss is the unmasked
    # loss of the first batch of the plainly packed rows, and the tokens are those of the answer-only encoding
    import copy

    from spikingbrain.train.data import PackedBatches, encode_chat_example, pack
    from spikingbrain.train.trainer import distill_loss

    teacher, student, _ = pair
    chats = write_code_word_chats(tmp_path / "chats.jsonl")
    cfg = write_config(tmp_path / "c.yaml", (teacher, student, chats), tmp_path / "run", calibrate=False,
                       held_out_fraction=0.1, chat_loss="all")
    config = load_train_config(cfg, ["stages.1.steps=1", "stages.1.grad_accum=1", "stages.1.seq_len=128"])
    config.stages = config.stages[1:]
    trainer = Trainer(config, progress=False)
    assert trainer.train_masks is None
    ids = trainer.train_tokens[0]
    assert ids == encode_chat_example(trainer.tokenizer, *_prompt_and_answer(trainer.tokenizer.decode(ids)))[0]
    untrained = copy.deepcopy(trainer.student)
    trainer.run()
    logged = next(r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r)
    stage = config.stages[0]
    batch = next(PackedBatches(pack(trainer.train_tokens, stage.seq_len, trainer.separator), stage.batch_size, seed=config.seed))
    with torch.no_grad():
        expected, _ = distill_loss(untrained, trainer.teacher, batch, stage.kl_weight, stage.ce_weight)
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-4)
    with pytest.raises(ValueError, match=r"chat_loss='prompt'; use one of \['answer', 'all'\]"):
        dataclasses.replace(config, chat_loss="prompt").validate()


def test_a_stage_trains_on_its_own_data_with_the_answers_share(tmp_path, pair):
    # the run's data is plain text; the distill stage reads chats too, their answers carrying half of its loss
    import copy

    from spikingbrain.train.data import PackedBatches
    from spikingbrain.train.trainer import distill_loss, target_weights

    teacher, student, _ = pair
    plain, mixed = tmp_path / "plain.txt", tmp_path / "mixed.jsonl"
    plain.write_text("The river keeps moving past the old mill, and the lamps are lit one by one. " * 12)
    mixed.write_text("".join(
        json.dumps({"text": f"Lamp {i} is lit by the keeper at dusk, as every evening."}) + "\n"
        + json.dumps({"prompt": f"Note {i}: the code word is lantern-{i}. What is the code word?",
                      "answer": f"The code word is lantern-{i}."}) + "\n" for i in range(40)))
    cfg = write_config(tmp_path / "c.yaml", (teacher, student, plain), tmp_path / "run", calibrate=False, held_out_fraction=0.05)
    config = load_train_config(cfg, ["stages.1.steps=1", "stages.1.grad_accum=1", "stages.1.seq_len=256"])
    config.stages = config.stages[1:]
    config.stages[0].data, config.stages[0].answer_share = [str(mixed)], 0.5
    trainer = Trainer(config, progress=False)
    assert trainer.train_masks is None  # the run's own data has no chats
    stage = config.stages[0]
    rows, targets = trainer._packed(stage)
    assert "lantern-" in trainer.tokenizer.decode(rows.flatten().tolist()) and (targets == 2).any() and (targets == 1).any()
    batch, codes = PackedBatches(rows, stage.batch_size, seed=config.seed, loss_mask=targets).next_with_mask()
    assert (codes == 1).any() and (codes == 2).any()  # the first batch holds both kinds
    untrained = copy.deepcopy(trainer.student)
    trainer.run()
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    with torch.no_grad():
        expected, _ = distill_loss(untrained, trainer.teacher, batch, stage.kl_weight, stage.ce_weight,
                                   loss_mask=target_weights(codes, 0.5))
        alike, _ = distill_loss(untrained, trainer.teacher, batch, stage.kl_weight, stage.ce_weight, loss_mask=codes > 0)
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert logged["loss"] != pytest.approx(alike.item(), rel=1e-3)
    with pytest.raises(ValueError, match=r"stages\[0\].answer_share must be in \(0, 1\)"):
        dataclasses.replace(config, stages=[dataclasses.replace(stage, answer_share=1.0)]).validate()


def test_answer_share_weights_hand_computed():
    from spikingbrain.train.trainer import target_weights

    # codes: 0 not scored, 1 plain text, 2 an answer; 3 plain tokens share 0.75, 2 answer tokens share 0.25
    targets = torch.tensor([[1, 1, 0, 2], [0, 2, 1, 0]], dtype=torch.uint8)
    weights = target_weights(targets, 0.25)
    assert weights.tolist() == [[0.25, 0.25, 0.0, 0.125], [0.0, 0.125, 0.25, 0.0]]
    assert target_weights(targets, None).tolist() == (targets > 0).tolist()
    # with no answer (or no plain text) in the micro-batch every scored token counts alike
    assert target_weights(torch.tensor([[1, 0, 1]], dtype=torch.uint8), 0.25).tolist() == [[True, False, True]]
    assert target_weights(torch.tensor([[2, 0, 2]], dtype=torch.uint8), 0.25).tolist() == [[True, False, True]]


def _prompt_and_answer(text: str) -> tuple[str, str]:
    """The user's prompt and the assistant's answer of one rendered SmolLM2 chat."""
    user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    answer = text.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    return user, answer


def test_training_leaves_the_flush_to_zero_mode_as_it_found_it(tmp_path, pair):
    # training flushes subnormal floats (fast attention backward on CPU); afterwards 5e-324 is a number again
    import sys

    from spikingbrain.runtime.machine import flushing_denormals

    tiny = sys.float_info.min / 2
    assert tiny > 0
    cfg = write_config(tmp_path / "c.yaml", pair, tmp_path / "run", steps=(1, 1))
    Trainer(load_train_config(cfg), progress=False).run()
    assert sys.float_info.min / 2 == tiny and torch.tensor(5e-324, dtype=torch.float64).item() > 0
    with flushing_denormals():
        assert sys.float_info.min / 2 == 0.0 and torch.tensor([tiny], dtype=torch.float64).mul(1.0).item() == 0.0
    assert sys.float_info.min / 2 == tiny


def test_export_latest_writes_the_checkpoints_student(tmp_path, pair, capsys):
    cfg = write_config(tmp_path / "c.yaml", pair, tmp_path / "run", steps=(2, 4))
    assert main(["train", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", str(cfg), "--export-latest"]) == 0  # the last checkpoint is the last step: the final model
    folder = tmp_path / "run" / "at-step-7"  # calibration, 2 transfer and 4 distillation steps
    assert f"wrote {folder}" in capsys.readouterr().out
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")(ids, use_cache=False).logits
        exported = AutoModelForCausalLM.from_pretrained(folder / "model")(ids, use_cache=False).logits
    assert torch.equal(exported, final)
    with safe_open(str(folder / "delta.safetensors"), framework="pt") as f:
        assert max(p["step"] for p in json.loads(f.metadata()["training_curve"])["points"]) == 7
    assert main(["train", str(write_config(tmp_path / "d.yaml", pair, tmp_path / "empty")), "--export-latest"]) == 2
    assert "no checkpoint to export" in capsys.readouterr().err


def test_a_run_started_from_a_delta_holds_the_model_that_delta_rebuilds(tmp_path, pair):
    # a first run writes a delta; a second run started from it (init_delta) holds, before any step, the model that
    # build_from_delta makes of it, and exports the same tensors; layouts or ranks that disagree are refused by name
    Trainer(load_train_config(write_config(tmp_path / "a.yaml", pair, tmp_path / "a", steps=(2, 2))), progress=False).run()
    delta = tmp_path / "a" / "delta.safetensors"
    second = Trainer(load_train_config(write_config(tmp_path / "b.yaml", pair, tmp_path / "b", steps=(1, 1), calibrate=False,
                                                    init_delta=str(delta))), progress=False)
    build_from_delta(delta, tmp_path / "rebuilt")
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        continued = second.student(ids, use_cache=False).logits
        rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt")(ids, use_cache=False).logits
        converted = AutoModelForCausalLM.from_pretrained(pair[1])(ids, use_cache=False).logits
    assert (continued - rebuilt).abs().max() < 1e-4 * rebuilt.abs().max()
    assert (continued - converted).abs().max() > 100 * (continued - rebuilt).abs().max()  # the delta did change the model
    second.export_delta(tmp_path / "b-delta.safetensors")
    _, _, first_tensors, _ = read_delta(delta)
    _, _, second_tensors, _ = read_delta(tmp_path / "b-delta.safetensors")
    assert first_tensors.keys() == second_tensors.keys()
    assert all(torch.equal(first_tensors[n], second_tensors[n]) for n in first_tensors)

    # trained to its end, the continuation's delta counts steps and tokens from the first run and continues its curve
    first_extra = read_delta(delta)[3]
    second.run()
    _, _, _, second_extra = read_delta(tmp_path / "b" / "delta.safetensors")
    own = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert second_extra["continued_from"] == {"delta": str(delta), "steps": first_extra["steps"],
                                              "tokens_seen": first_extra["tokens_seen"]}
    assert second_extra["steps"] == first_extra["steps"] + own["steps"]
    assert second_extra["tokens_seen"] == first_extra["tokens_seen"] + own["tokens_seen"]
    before, after = first_extra["training_curve"]["points"], second_extra["training_curve"]["points"]
    own_points = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    own_points = [p for p in own_points if "ppl_ratio" in p]
    assert after[:len(before)] == before and len(after) == len(before) + len(own_points)
    for moved, point in zip(after[len(before):], own_points):
        assert moved["step"] == point["step"] + first_extra["steps"] and moved["ppl"] == point["ppl"]
        assert moved["tokens_seen"] == point["tokens_seen"] + first_extra["tokens_seen"]
        if point["step"] > 0:  # the evaluation before the first step records no fraction
            assert moved["fraction_of_teacher_pretraining"] == pytest.approx(moved["tokens_seen"] / 2e12)

    config, teacher, tensors, extra = read_delta(delta)
    write_delta(tmp_path / "other-layout.safetensors", tensors, {**config, "layer_mixers": ["full"] * 4}, teacher, extra)
    for name, overrides, message in [
        ("layout", {"init_delta": str(tmp_path / "other-layout.safetensors")}, "convert the student with the delta's layout"),
        ("rank", {"init_delta": str(delta), "lora_rank": 2}, "check lora_rank"),
        ("scale", {"init_delta": str(delta), "lora_alpha": 64.0}, "set lora_rank and lora_alpha"),
        ("missing", {"init_delta": str(tmp_path / "nothing.safetensors")}, "neither a shipped model"),
    ]:
        cfg = load_train_config(write_config(tmp_path / f"{name}.yaml", pair, tmp_path / name, calibrate=False, **overrides))
        with pytest.raises(TrainingError, match=message):
            Trainer(cfg, progress=False)


def test_a_multiscale_calibration_is_in_the_delta(tmp_path, pair):
    # a run of the calibrate stage alone: its delta carries the gate biases it set (log-spaced half-lives) beside the
    # norm weights it fitted, and rebuilds the calibrated student
    from spikingbrain.convert.calibrate import multiscale_gate_bias

    cfg = load_train_config(write_config(tmp_path / "c.yaml", pair, tmp_path / "run"), ["stages.0.decay_init=multiscale"])
    cfg.stages = cfg.stages[:1]
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    _, _, tensors, _ = read_delta(tmp_path / "run" / "delta.safetensors")
    gla = [i for i, m in enumerate(trainer.student.config.layer_mixers) if m == "gla"]
    assert gla
    for i in gla:
        mixer = trainer.student.model.layers[i].attn
        name = next(n for n in tensors if n.startswith(f"model.layers.{i}.attn.gk_proj") and n.endswith("bias"))
        expected = multiscale_gate_bias(mixer.head_dim, mixer.gate_normalizer).float().repeat(mixer.num_kv_heads)
        assert torch.equal(tensors[name], expected)
        assert f"model.layers.{i}.attn.g_norm.weight" in tensors
