"""Needle-in-prose prompts (exact length, the fact once at its depth, the question in the chat template), scoring, repetition."""

from __future__ import annotations

import json
import re

import pytest
import torch

from spikingbrain.eval.needle import (FACTS, filler_paragraphs, is_degenerate, needle_prompt, plot_needle, run_needle,
                                      score_needle)

GENERATION_PROMPT = "<|im_end|>\n<|im_start|>assistant\n"


def _token_at(tokenizer, ids: list[int], char: int) -> int:
    """Index of the token that holds character ``char`` of ``tokenizer.decode(ids)`` (prefix decodes, bisected)."""
    low, high = 0, len(ids)
    while low < high:
        middle = (low + high) // 2
        if len(tokenizer.decode(ids[: middle + 1])) > char:
            high = middle
        else:
            low = middle + 1
    return low


def _user_message(text: str) -> str:
    return text.split("<|im_start|>user\n", 1)[1].removesuffix(GENERATION_PROMPT)


def test_the_fact_bank_is_large_varied_and_not_guessable():
    assert len(FACTS) >= 30
    assert len({fact.subject for fact in FACTS}) == len({fact.answer.lower() for fact in FACTS}) == len(FACTS)
    for fact in FACTS:
        expected = [fact.answer, *fact.variants]
        assert len(fact.statements) >= 3 and len(fact.questions) >= 3, fact.subject
        assert all(score_needle(statement, fact.answer) for statement in fact.statements), fact.subject
        assert not any(score_needle(question, expected) for question in fact.questions), fact.subject


@pytest.mark.parametrize("length", [256, 1000, 4096])
def test_prompt_has_the_exact_length_and_asks_in_the_chat_template(default_tokenizer, length):
    fact = FACTS[0]
    ids, expected = needle_prompt(default_tokenizer, length, 0.5, fact, phrasing_seed=3)
    assert len(ids) == length
    assert expected == [fact.answer]
    text = default_tokenizer.decode(ids)
    assert text.endswith(GENERATION_PROMPT) and text.count("<|im_start|>user") == 1
    message = _user_message(text)
    rebuilt = default_tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                    add_generation_prompt=True)
    assert rebuilt == text
    assert any(message.endswith(f"\n\n{question} Answer in a few words.") for question in fact.questions)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_the_fact_appears_once_at_its_depth(default_tokenizer, depth):
    fact = FACTS[7]
    ids, expected = needle_prompt(default_tokenizer, 1024, depth, fact, phrasing_seed=11)
    text = default_tokenizer.decode(ids)
    message = _user_message(text)
    [statement] = [s for s in fact.statements if s in text]
    assert text.count(statement) == 1
    assert len(re.findall(rf"\b{fact.answer}\b", message)) == 1
    # tokens of the document: after the instruction's line, before the question's paragraph
    document_start = _token_at(default_tokenizer, ids, text.index("follows it.") + len("follows it."))
    document_end = _token_at(default_tokenizer, ids, text.rindex("\n\n", 0, text.rindex("Answer in a few words.")))
    fact_start = _token_at(default_tokenizer, ids, text.index(statement))
    statement_tokens = len(default_tokenizer(" " + statement, add_special_tokens=False)["input_ids"])
    fraction = (fact_start - document_start) / (document_end - document_start - statement_tokens)
    assert fraction == pytest.approx(depth, abs=0.06)
    if depth == 0.0:
        assert message.startswith(f"Read the text below, then answer the question that follows it.\n\n{statement}")


def test_phrasings_and_filler_vary_with_the_seed(default_tokenizer):
    fact = FACTS[2]
    prompts = [default_tokenizer.decode(needle_prompt(default_tokenizer, 300, 0.5, fact, seed)[0]) for seed in range(12)]
    assert len({next(s for s in fact.statements if s in p) for p in prompts}) > 1
    assert len({next(q for q in fact.questions if q in p) for p in prompts}) > 1
    assert len(set(prompts)) == len(prompts)


def test_prompt_errors_name_the_fix(default_tokenizer):
    with pytest.raises(ValueError, match="at least"):
        needle_prompt(default_tokenizer, 60, 0.5, FACTS[0], 0)
    with pytest.raises(ValueError, match="depth"):
        needle_prompt(default_tokenizer, 300, 1.5, FACTS[0], 0)


def test_filler_from_a_text_file_or_corpus_records(tmp_path, default_tokenizer):
    prose = ("The orchard lay quiet under a low grey sky all through that week. The ladders stood against the trees.\n\n"
             "    indented code is not prose at all, so it is left out of the filler\n\n"
             "Heading\n=======\n\nShort line.\n\n"
             "A cart came up the lane each morning with bread and milk. The driver never said a word to anyone.\n")
    (tmp_path / "prose.txt").write_text(prose)
    (tmp_path / "prose.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prose.split("\n\n")))
    for name in ("prose.txt", "prose.jsonl"):
        paragraphs = filler_paragraphs(tmp_path / name)
        assert paragraphs == ["The orchard lay quiet under a low grey sky all through that week. The ladders stood against the trees.",
                              "A cart came up the lane each morning with bread and milk. The driver never said a word to anyone."]
    ids, _ = needle_prompt(default_tokenizer, 400, 0.5, FACTS[0], 0, paragraphs)
    assert "The driver never said a word to anyone." in default_tokenizer.decode(ids)
    (tmp_path / "code.txt").write_text("    x = 1\n    y = 2\n")
    with pytest.raises(ValueError, match="no prose paragraphs"):
        filler_paragraphs(tmp_path / "code.txt")


def test_score_needle():
    assert score_needle("The ferret was called Pipwhistle.", ["Pipwhistle"])
    assert score_needle("pipwhistle", "Pipwhistle")  # case does not matter
    assert not score_needle("It was called Whiskers.", ["Pipwhistle"])
    assert score_needle("There are four hundred and seventeen lanterns.", ["417", "four hundred and seventeen"])
    assert score_needle("It has 417 lanterns", ["417", "four hundred and seventeen"])
    assert not score_needle("It has 4170 lanterns", ["417"])  # a substring, not the word
    assert not score_needle("The Pipwhistles were a family", ["Pipwhistle"])
    assert score_needle("He captained the Marigold\nDawn.", ["Marigold Dawn"])
    assert not score_needle("a marigold at dawn", ["Marigold Dawn"])
    assert not score_needle("", ["teal"])


def test_is_degenerate():
    assert is_degenerate("Elliot Elliot Elliot")
    assert is_degenerate("The answer is: The answer is: The answer is: The")
    assert is_degenerate("It is the the the end")
    assert is_degenerate("ok. Red door, red door, RED DOOR")
    assert is_degenerate('The answer to the question "What is the answer to the question "What is the answer to')  # cut off
    assert is_degenerate("The name is SandraViaViaViaVia")
    assert is_degenerate("The code is:\n\n#\n\n#\n\n#")
    assert not is_degenerate("The door is teal.")
    assert not is_degenerate("It was 1000000 years ago, in Mississippi.")
    assert not is_degenerate("The answer is: teal. The answer is: teal.")  # twice is not three times
    assert not is_degenerate("Pipwhistle")
    assert not is_degenerate("")


def test_run_needle_reports_every_answer_and_the_ratio(tmp_path, default_tokenizer):
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    torch.manual_seed(0)
    tiny = SpikingBrainForCausalLM(SpikingBrainConfig(
        vocab_size=len(default_tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16, gla_chunk_size=16, layer_mixers=["gla", "swa"])).eval()
    result = run_needle({"ours": tiny, "teacher": tiny}, default_tokenizer, [200, 260], [0.0, 1.0], trials=2, seed=1,
                        max_new_tokens=4, progress=False)
    assert set(result["models"]) == {"ours", "teacher"}
    ours = result["models"]["ours"]
    assert len(ours["answers"]) == 8
    assert len({a["subject"] for a in ours["answers"]}) == 8  # a different fact for every prompt
    for answer in ours["answers"]:
        assert answer["correct"] == score_needle(answer["answer"], answer["expected"])
        assert answer["degenerate"] == is_degenerate(answer["answer"])
    assert [len(row) for row in ours["accuracy"]] == [2, 2]
    assert ours["accuracy"] == result["models"]["teacher"]["accuracy"]
    assert set(result["ratio"]) == {"200", "260", "overall"}
    assert all(value in (None, 1.0) for value in result["ratio"].values())
    json.dumps(result)
    assert plot_needle(result, tmp_path / "needle.png").stat().st_size > 0


@pytest.mark.real_model
def test_the_teacher_answers_questions_about_short_texts(default_tokenizer):
    from spikingbrain.model.loading import load_model

    result = run_needle({"teacher": load_model("default")}, default_tokenizer, [384], [0.5], trials=3, progress=False)
    teacher = result["models"]["teacher"]
    assert sum(a["correct"] for a in teacher["answers"]) >= 1, teacher["answers"]


def test_eval_needle_command_compares_ours_with_the_teacher(pair, tmp_path, capsys):
    """``spikingbrain eval needle`` on a tiny conversion and its teacher: JSON with both models and their ratio, a PNG."""
    import json

    import torch

    from spikingbrain.cli import main

    teacher, student, _ = pair
    filler = tmp_path / "prose.txt"
    filler.write_text("\n\n".join(f"The boat left the harbour at dawn on day {i}. Gulls followed it out." for i in range(200)))
    out = tmp_path / "needle"
    threads = torch.get_num_threads()
    try:
        code = main(["eval", "needle", "--model", str(student), "--baseline", str(teacher), "--lengths", "200",
                     "--depths", "0.5", "--trials", "2", "--filler", str(filler), "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads((out / "needle.json").read_text())
    assert set(result["models"]) == {"ours", "teacher"} and "ratio" in result
    assert result["filler"] == str(filler) and len(result["models"]["ours"]["answers"]) == 2
    assert (out / "needle.png").read_bytes()[:4] == b"\x89PNG"
    assert "degenerate answers" in capsys.readouterr().out
