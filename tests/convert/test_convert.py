"""`spikingbrain convert`: layer plans, mapping completeness, exactness of an all-full conversion, errors.

References: transformers' own Llama/Qwen2/Mistral implementations (an all-``full`` conversion must
compute their function) and hand-written layouts.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import spikingbrain  # noqa: F401
from reference_impl import randomize_
from spikingbrain.cli import main
from spikingbrain.convert.converter import convert_transformer
from spikingbrain.convert.plan import plan_layers
from spikingbrain.model.checkpoint import CheckpointError

SHAPES = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}


def source_folder(tmp_path, family: str, tie: bool = False):
    config_cls, model_cls, extra = FAMILIES[family]
    model = randomize_(model_cls(config_cls(**SHAPES, tie_word_embeddings=tie, **extra)), seed=3).eval()
    folder = tmp_path / family
    model.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return model, folder


def assert_generate_matches_argmax_loop(model, ids, steps):
    """Greedy generate() (with its cache) equals argmax over full forwards without a cache."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False)
        manual = ids
        for _ in range(steps):
            manual = torch.cat((manual, model(manual, use_cache=False).logits[:, -1:].argmax(-1)), 1)
    assert out.tolist() == manual.tolist()


def test_plans():
    assert plan_layers(4, "alternating") == ["gla", "swa", "gla", "swa"]
    assert plan_layers(8, "3:1") == ["gla", "gla", "gla", "swa"] * 2
    assert plan_layers(4, "full") == ["full"] * 4
    assert plan_layers(4, "gla,swa,full,gla") == ["gla", "swa", "full", "gla"]
    assert plan_layers(4, "alternating", full_layers=[1, 3]) == ["gla", "full", "gla", "full"]


@pytest.mark.parametrize(
    "layout, full, message",
    [
        ("alternating", [4], "do not exist"),
        ("gla,swa", [], "2 mixers but the source model has 4 layers"),
        ("gla,swa,xyz,gla", [], "unknown mixers ['xyz']"),
        ("sideways", [], "unknown layout 'sideways'"),
        ("3:x", [], "two whole numbers"),
    ],
)
def test_plan_errors(layout, full, message):
    with pytest.raises(ValueError) as err:
        plan_layers(4, layout, full)
    assert message in str(err.value)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_mapping_is_complete(tmp_path, family, tie):
    source, folder = source_folder(tmp_path, family, tie)
    report = convert_transformer(folder, tmp_path / "out", layout="alternating", sliding_window=8)
    source_names = set(source.state_dict())
    if tie:
        source_names.discard("lm_head.weight")  # transformers does not save the tied copy
    assert set(report.mapped) | set(report.dropped) == source_names
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert set(report.mapped.values()) | set(report.new) == set(converted.state_dict()) - ({"lm_head.weight"} if tie else set())
    assert all(".attn.gk_proj." in n or ".attn.g_norm." in n for n in report.new)
    assert len(report.new) == 2 * 4  # two GLA layers x (gate down, gate up weight, gate up bias, norm)
    saved = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert saved["layer_mixers"] == ["gla", "swa", "gla", "swa"] and saved["sliding_window"] == 8
    assert "chat_template.jinja" in report.copied_files and (tmp_path / "out" / "chat_template.jinja").is_file()
    # mapped weights are the source's own
    mapped = dict(converted.named_parameters())
    for src, dst in report.mapped.items():
        assert torch.equal(source.state_dict()[src], mapped[dst]), src


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_full_conversion_equals_the_source(tmp_path, family):
    source, folder = source_folder(tmp_path, family)
    convert_transformer(folder, tmp_path / "out", layout="full")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (converted(ids, use_cache=False).logits - source(ids).logits).abs().max() < 1e-4


def test_converted_folder_generates(tmp_path):
    _, folder = source_folder(tmp_path, "qwen2")
    convert_transformer(folder, tmp_path / "out", layout="3:1", full_layers=[3])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.layer_mixers == ["gla", "gla", "gla", "full"]
    assert_generate_matches_argmax_loop(model, torch.tensor([[5, 6, 7]]), 6)


def test_cli_convert_and_errors(tmp_path, capsys):
    _, folder = source_folder(tmp_path, "llama")
    assert main(["convert", str(folder), str(tmp_path / "out"), "--layout", "alternating", "--window", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layer_mixers"] == ["gla", "swa", "gla", "swa"]
    # the output folder exists now: refuse to overwrite it
    assert main(["convert", str(folder), str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert", str(folder), str(tmp_path / "o2"), "--full-layers", "9"]) == 2
    assert "do not exist" in capsys.readouterr().err
    # an unsupported architecture is named with the supported ones
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="gpt2"):
        convert_transformer(folder, tmp_path / "o3")
    assert not (tmp_path / "o3").exists()


def test_cli_converts_to_the_delta_rule_with_every_write_strength_at_one_half(tmp_path, capsys):
    _, folder = source_folder(tmp_path, "llama")
    assert main(["convert", str(folder), str(tmp_path / "out"), "--window", "16", "--gla-update", "delta", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["new"]["model.layers.0.attn.beta_proj.weight"].startswith("zeros")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.gla_update == "delta"
    beta = model.model.layers[0].attn.beta_proj
    assert beta.weight.abs().max() == 0 and beta.bias.abs().max() == 0
    assert beta.weight.shape == (model.config.num_key_value_heads, model.config.hidden_size)
    assert_generate_matches_argmax_loop(model, torch.tensor([[5, 6, 7]]), 6)


def test_76b_style_conversion(tmp_path):
    """Parallel GLA+SWA layers with full attention at one layer, sinks, key-tied GLA and upcycled experts."""
    source, folder = source_folder(tmp_path, "qwen2")
    report = convert_transformer(
        folder, tmp_path / "out", layout="parallel", full_layers=[3], num_sink_tokens=3, gla_gate="key_tied",
        gla_feature_map="sigmoid", upcycle=dict(num_experts=4, num_experts_per_tok=2, num_shared_experts=1, dense_ffn_layers=[0]),
    )
    assert report.layer_mixers == ["parallel-swa"] * 3 + ["parallel-full"]
    assert set(report.mapped) | set(report.dropped) == set(source.state_dict())
    assert not any("gk_proj" in n for n in report.new)  # key-tied: no gate parameters
    assert {n.split(".")[-2] if n.endswith("weight") else n.split(".")[-1] for n in report.new} >= {"sinks", "router", "norm", "g_norm"}
    assert "upcycled" in report.mapped["model.layers.1.mlp.up_proj.weight"]
    assert report.mapped["model.layers.0.mlp.up_proj.weight"] == "model.layers.0.mlp.up_proj.weight"  # dense layer kept
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    gate = model.model.layers[1].mlp.experts[2].gate_proj.weight
    assert torch.equal(gate, source.model.layers[1].mlp.gate_proj.weight)  # 'exact' scaling leaves the gate as is
    assert_generate_matches_argmax_loop(model, torch.tensor([[5, 6, 7, 8]]), 5)
