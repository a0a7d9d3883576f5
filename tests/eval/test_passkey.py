"""Pass-key prompts (exact length, key at the asked depth), scoring, greedy decoding against a full recompute."""

from __future__ import annotations

import pytest
import torch

from spikingbrain.eval.passkey import greedy_tokens, passkey_prompt, run_passkey, score_answer


def test_score_answer():
    assert score_answer(" 48213. Remember", "48213")
    assert not score_answer(" 48214", "48213")
    assert not score_answer(" 482131", "48213")  # the whole first number must match
    assert not score_answer(" the pass key", "48213")
    assert score_answer("is: 48213 and 11111", "48213")


@pytest.mark.real_model
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_has_the_exact_length_and_the_key_at_its_depth(default_tokenizer, depth):
    ids = passkey_prompt(default_tokenizer, 300, depth, "48213")
    assert len(ids) == 300
    text = default_tokenizer.decode(ids)
    assert text.startswith("A pass key is hidden") and text.endswith("What is the pass key? The pass key is")
    assert text.count("48213") == 2
    where = text.index("The pass key is 48213") / len(text)
    assert where == pytest.approx(depth, abs=0.12)
    with pytest.raises(ValueError, match="at least"):
        passkey_prompt(default_tokenizer, 20, 0.5, "48213")
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(default_tokenizer, 300, 1.5, "48213")


def test_greedy_tokens_equal_a_full_recompute():
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    torch.manual_seed(0)
    ours = SpikingBrainForCausalLM(SpikingBrainConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, gla_chunk_size=16, layer_mixers=["gla", "swa"])).eval()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    prompt = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    for model in (ours, llama):
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        assert greedy_tokens(model, prompt, 6) == ids[len(prompt):]


@pytest.mark.real_model
def test_the_teacher_finds_a_key_in_a_short_prompt(default_folder, default_tokenizer):
    from spikingbrain.runtime.candidates import load_baseline

    result = run_passkey({"teacher": load_baseline(str(default_folder))}, default_tokenizer, [200], [0.5], trials=2)
    teacher = result["models"]["teacher"]
    assert [a["correct"] for a in teacher["answers"]] == [score_answer(a["answer"], a["key"]) for a in teacher["answers"]]
    assert teacher["accuracy"] == [[1.0]], teacher["answers"]
