"""Perplexity in windows against independent computations: a per-window log-softmax loop over the fp64
reference forward, and transformers' own Llama on the embedded model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from reference_impl import randomize_, reference_logits, spec_for
from spikingbrain.cli import main
from spikingbrain.eval import perplexity as ppl_module
from spikingbrain.eval.perplexity import perplexity, perplexity_of_text, windows


def test_windows_hand_computed():
    assert windows(10, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert windows(9, 4) == [(0, 4, 1), (4, 8, 5)]  # a last window of one token scores nothing
    assert windows(3, 8) == [(0, 3, 1)]
    # Overlapping windows score only what the previous window did not.
    assert windows(10, 4, stride=2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]


@pytest.mark.parametrize(
    "length, context, stride, message",
    [(10, 1, None, "context must be >= 2"), (10, 4, 5, "stride must be between 1 and the context"),
     (10, 4, 0, "stride must be between"), (1, 4, None, "at least 2 tokens, got 1")],
)
def test_window_errors(length, context, stride, message):
    with pytest.raises(ValueError, match=message):
        windows(length, context, stride)


@pytest.fixture(scope="module")
def tiny():
    """A random three-layer hybrid (GLA, sliding window, full attention)."""
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    config = SpikingBrainConfig(
        vocab_size=61, hidden_size=24, intermediate_size=40, num_attention_heads=3, num_key_value_heads=1,
        num_hidden_layers=3, layer_mixers=["gla", "swa", "full"], sliding_window=4, gla_chunk_size=8,
    )
    return randomize_(SpikingBrainForCausalLM(config), seed=3).eval()


def reference_ppl(logits_of, ids: torch.Tensor, spans) -> tuple[float, int]:
    """Mean NLL and scored count: one window at a time, fp64 log-softmax, gather of the next token."""
    total, count = 0.0, 0
    for start, end, first in spans:
        logp = torch.log_softmax(logits_of(ids[start:end].unsqueeze(0))[0].double(), dim=-1)
        positions = torch.arange(first - start - 1, end - start - 1)
        total -= logp[positions, ids[start + 1 + positions]].sum().item()
        count += len(positions)
    return total / count, count


@pytest.mark.parametrize("stride, batch_size, slice_", [(None, 1, 128), (None, 2, 5), (6, 3, 4)])
def test_perplexity_against_the_reference_forward(tiny, monkeypatch, stride, batch_size, slice_):
    monkeypatch.setattr(ppl_module, "SLICE", slice_)
    ids = torch.randint(0, 61, (50,), generator=torch.Generator().manual_seed(0))
    state, spec = tiny.state_dict(), spec_for(tiny.config)
    # 50 tokens in windows of 16: three full windows and a final one of 2 tokens.
    spans = [(0, 16, 1), (16, 32, 17), (32, 48, 33), (48, 50, 49)] if stride is None else windows(50, 16, stride)
    nll, count = reference_ppl(lambda x: reference_logits(state, spec, x), ids, spans)
    result = perplexity(tiny, ids, context=16, stride=stride, batch_size=batch_size)
    assert result["tokens"] == count == (46 if stride is None else 49)
    assert result["windows"] == len(spans) and result["context"] == 16 and result["input_tokens"] == 50
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_perplexity_input_errors(tiny):
    with pytest.raises(ValueError, match="1-D"):
        perplexity(tiny, torch.zeros(2, 5, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        perplexity(tiny, torch.zeros(5, dtype=torch.long), 4, batch_size=0)


@pytest.mark.real_model
def test_our_model_matches_transformers_llama_on_pydoc(default_folder, default_tokenizer):
    from pydoc_data.topics import topics
    from transformers import LlamaForCausalLM

    from spikingbrain.model.loading import load_model

    ids = torch.tensor(default_tokenizer(topics["assignment"], add_special_tokens=False)["input_ids"][:300])
    teacher = LlamaForCausalLM.from_pretrained(default_folder).eval()
    with torch.inference_mode():
        nll, count = reference_ppl(lambda x: teacher(x).logits, ids, windows(300, 128))
    ours = perplexity(load_model(default_folder), ids, context=128)
    assert ours["tokens"] == count == 297
    assert ours["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)
    # The same function on transformers' model.
    assert perplexity(teacher, ids, context=128)["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert 1.5 < ours["ppl"] < 100  # real English documentation, not noise


@pytest.mark.real_model
def test_perplexity_of_text_reads_the_text_as_plain_tokens(default_tokenizer):
    vocab = len(default_tokenizer)

    class Uniform(torch.nn.Module):
        """Equal logits for every token (perplexity = vocabulary size); records what it was given."""

        def __init__(self):
            super().__init__()
            self.weight, self.seen = torch.nn.Parameter(torch.zeros(1)), []

        def forward(self, input_ids, use_cache=False):
            self.seen.append(input_ids.clone())
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, vocab)})()

    text = "plain text with <|im_end|> inside. " * 10
    model = Uniform()
    result = perplexity_of_text(model, default_tokenizer, text, context=32, max_tokens=40)
    seen = torch.cat([ids[0] for ids in model.seen]).tolist()
    # The first 40 tokens spell the start of the text; the special-token string is read as text.
    assert default_tokenizer.eos_token_id not in seen and text.startswith(default_tokenizer.decode(seen))
    assert "<|im_end|>" in default_tokenizer.decode(seen)
    assert len(seen) == result["input_tokens"] == 40 and result["tokens"] == 40 - 2
    assert result["ppl"] == pytest.approx(vocab)


@pytest.mark.real_model
def test_cli_eval_ppl_json(tmp_path, capsys, default_tokenizer):
    from pydoc_data.topics import topics

    text = tmp_path / "held_out.txt"
    text.write_text(topics["assert"] + topics["while"])
    assert main(["eval", "ppl", "--model", "default", "--text", str(text), "--context", "64", "--max-tokens", "200", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"ppl", "nll", "tokens", "context", "windows", "model", "file", "seconds"} <= set(result)
    # 200 tokens in windows of 64: 64, 64, 64, 8, each scoring all but its first token.
    assert (result["tokens"], result["windows"], result["context"]) == (196, 4, 64)
    assert result["ppl"] == pytest.approx(math.exp(result["nll"])) and result["file"] == str(text)


def test_cli_eval_ppl_errors_exit_2(tmp_path, capsys):
    assert main(["eval", "ppl", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["eval", "ppl", "--text", str(tmp_path / "empty.txt")]) == 2
    assert "empty.txt: the file has no text" in capsys.readouterr().err
    (tmp_path / "ok.txt").write_text("some text")
    assert main(["eval", "ppl", "--text", str(tmp_path / "ok.txt"), "--context", "1"]) == 2
    assert "context must be >= 2" in capsys.readouterr().err
