"""Training data: loaders and their errors, the held-out split, tokenising, packing, resumable batches, synthesis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from spikingbrain.cli import main
from spikingbrain.train.data import (
    Document,
    PackedBatches,
    encode_chat_example,
    encode_documents,
    load_documents,
    pack,
    pack_loss_masks,
    packed_rows_with_targets,
    row_fitting_order,
    split_held_out,
    synth_documents,
    tokenize_documents,
)

# ----------------------------------------------------------------------------- loading


def test_text_markdown_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "b.md").write_text("# Title\nsecond")
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 7}\n{"text": "  "}\n')
    docs = load_documents([tmp_path / "b.md", str(tmp_path / "a.txt"), tmp_path / "c.jsonl"])
    assert [(d.name, d.text) for d in docs] == [
        (str(tmp_path / "b.md"), "# Title\nsecond"),
        (str(tmp_path / "a.txt"), "first document\n"),
        (f"{tmp_path / 'c.jsonl'}:1", "one"),
        (f"{tmp_path / 'c.jsonl'}:3", "two"),
    ]


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "deep.txt").write_text("deep")
    (tmp_path / "b.jsonl").write_text('{"text": "bee"}\n')
    (tmp_path / "a.md").write_text("ay")
    (tmp_path / "notes.csv").write_text("ignored,because,not,text")
    docs = load_documents([tmp_path])
    assert [d.text for d in docs] == ["ay", "bee", "deep"]


def test_pydoc_topics_one_document_per_topic():
    from pydoc_data.topics import topics

    docs = load_documents(["pydoc"])
    assert [d.name for d in docs] == [f"pydoc:{name}" for name in sorted(topics)]
    assert all(d.text == topics[d.name.removeprefix("pydoc:")] for d in docs)


def _write(path, content):
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("data.csv", "a,b", ["unsupported file type '.csv'", ".txt, .md, .jsonl"]),
        ("empty.txt", "", ["has no text", "add text"]),
        ("blank.md", " \n\t\n", ["has no text"]),
        ("nul.txt", b"abc\x00def", ["binary content", "UTF-8"]),
        ("latin.txt", "café".encode("latin-1"), ["not UTF-8", "re-encode it as UTF-8"]),
        ("bad.jsonl", '{"text": "ok"}\n{"text": 3}\n', ["line 2", "'text'", "int", '{"text": "..."}']),
        ("nofield.jsonl", '{"body": "x"}\n', ["line 1", "'text'", "NoneType"]),
        ("broken.jsonl", '{"text": "ok"}\n\n{"text": \n', ["line 3", "invalid JSON", "one JSON object per line"]),
        ("list.jsonl", '["text"]\n', ["line 1", "'text'"]),
        ("blanktexts.jsonl", '{"text": ""}\n{"text": " "}\n', ["no line has any text"]),
    ],
)
def test_bad_files_are_named_with_the_fix(tmp_path, name, content, expected):
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError) as err:
        load_documents([path])
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_missing_path_empty_folder_and_no_sources(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        load_documents([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty" / "x.bin", b"\x01\x02")
    with pytest.raises(ValueError, match=r"empty: the folder has no \.txt, \.md, \.jsonl files"):
        load_documents([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no data sources given"):
        load_documents([])


def test_a_bad_file_inside_a_folder_is_named(tmp_path):
    _write(tmp_path / "good.txt", "fine")
    (tmp_path / "sub").mkdir()
    bad = _write(tmp_path / "sub" / "bad.txt", b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="not UTF-8") as err:
        load_documents([tmp_path])
    assert str(bad) in str(err.value)


# ----------------------------------------------------------------------------- held-out split


def test_split_is_deterministic_disjoint_and_complete():
    docs = load_documents(["pydoc"])
    train, held = split_held_out(docs, 0.1, seed=0)
    again_train, again_held = split_held_out(docs, 0.1, seed=0)
    assert [d.name for d in train] == [d.name for d in again_train] and [d.name for d in held] == [d.name for d in again_held]
    assert not {d.name for d in train} & {d.name for d in held}
    assert sorted(d.name for d in train + held) == sorted(d.name for d in docs)
    assert 2 <= len(held) <= 20  # 10 % of 79 documents, by hash
    other = split_held_out(docs, 0.1, seed=1)[1]
    assert {d.name for d in other} != {d.name for d in held}
    # Order within each side follows the input order.
    order = {d.name: i for i, d in enumerate(docs)}
    assert [order[d.name] for d in train] == sorted(order[d.name] for d in train)


def test_split_does_not_depend_on_python_hash_randomisation():
    code = (
        "from spikingbrain.train.data import load_documents, split_held_out;"
        "print(','.join(d.name for d in split_held_out(load_documents(['pydoc']), 0.2, 3)[1]))"
    )
    names = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        names.append(result.stdout.strip())
    assert names[0] == names[1] and names[0]


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_two_documents_put_one_on_each_side(fraction):
    docs = [Document("a", "alpha"), Document("b", "beta")]
    train, held = split_held_out(docs, fraction)
    assert len(train) == 1 and len(held) == 1 and {train[0].name, held[0].name} == {"a", "b"}


def test_a_single_document_is_cut_in_two():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, held = split_held_out([Document("only", text)], 0.1)
    assert [d.name for d in train] == ["only#train"] and [d.name for d in held] == ["only#held_out"]
    assert train[0].text == text[:900] and held[0].text == text[900:]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_fraction_out_of_range(fraction):
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_held_out([Document("a", "x"), Document("b", "y")], fraction)


# ----------------------------------------------------------------------------- tokens and packing


@pytest.mark.real_model
def test_tokenize_documents_plain_text_without_special_tokens(default_tokenizer):
    docs = [Document("a", "Hello world."), Document("b", "A tag <|im_end|> in text.")]
    ids = tokenize_documents(docs, default_tokenizer)
    assert ids[0] == default_tokenizer.encode("Hello world.", add_special_tokens=False)
    eos = default_tokenizer.eos_token_id
    assert eos not in ids[1] and default_tokenizer.decode(ids[1]) == "A tag <|im_end|> in text."
    assert default_tokenizer.bos_token_id not in ids[0] + ids[1]


@pytest.mark.real_model
def test_tokenize_documents_separator_inside_a_document(default_tokenizer):
    hello = default_tokenizer.encode("Hello", add_special_tokens=False)[0]
    with pytest.raises(ValueError, match=f"b: the text contains the separator token {hello}"):
        tokenize_documents([Document("a", "x"), Document("b", "Hello there")], default_tokenizer, separator_id=hello)


def test_tokenize_documents_needs_a_separator():
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="no eos_token_id"):
        tokenize_documents([Document("a", "x")], NoEos())


def test_pack_hand_computed():
    lists = [[1, 2, 3], [4, 5], [6]]  # stream: 1 2 3 0 4 5 0 6 0 (9 tokens)
    assert pack(lists, 4, 0).tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert pack(lists, 3, 0).tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert pack(lists, 9, 0).dtype == torch.long
    with pytest.raises(ValueError, match=r"only 9 tokens .* seq_len=10; add text or lower the sequence length"):
        pack(lists, 10, 0)


def test_pack_loss_masks_hand_computed():
    # stream: 1 2 3 0 | 4 5 0 6 | 0 7 8 0 | (9 0 dropped); the second and fourth documents are chat examples
    lists = [[1, 2, 3], [4, 5], [6], [7, 8], [9]]
    masks = [None, [False, True], None, [True, True], [True]]
    assert pack(lists, 4, 0).tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [0, 7, 8, 0]]
    assert pack_loss_masks(lists, masks, 4).int().tolist() == [[1, 1, 1, 1], [0, 1, 0, 1], [1, 1, 1, 0]]
    assert pack_loss_masks(lists, masks, 3).int().tolist() == [[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0]]
    # rows of 5: both chat examples straddle two rows ([4 | 5] and [7 | 8]), so nothing of them is scored
    assert pack(lists, 5, 0).tolist() == [[1, 2, 3, 0, 4], [5, 0, 6, 0, 7]]
    assert pack_loss_masks(lists, masks, 5).int().tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 0]]


def test_row_fitting_order_hand_computed():
    # rows of 4; chats [1 2] and [3 4 5], plain [6] and [7 8]: [1 2] fits at the start, [3 4 5] then has room 1
    # and waits while [6] fills the gap, then fits whole in row 2
    lists = [[1, 2], [3, 4, 5], [6], [7, 8]]
    masks = [[True] * 2, [True] * 3, None, None]
    order = row_fitting_order(lists, masks, 4)
    assert order == [0, 2, 1, 3]
    ordered = [lists[i] for i in order]
    assert pack(ordered, 4, 0).tolist() == [[1, 2, 0, 6], [0, 3, 4, 5], [0, 7, 8, 0]]
    assert pack_loss_masks(ordered, [masks[i] for i in order], 4).int().tolist() == [[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1]]
    # in the given order [3 4 5] would straddle rows 1 and 2, and lose its answer
    assert pack_loss_masks(lists, masks, 4).int().tolist() == [[1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]]
    # chats go first when they fit; a chat longer than a row goes with the plain text; chats left when the plain
    # text runs out come last; plain text alone keeps its order
    assert row_fitting_order([[1, 2], [3, 4, 5], [6, 7, 8]], [None, [True] * 3, None], 4) == [1, 0, 2]
    assert row_fitting_order([[9], [1, 2, 3, 4, 5]], [None, [True] * 5], 4) == [0, 1]
    assert row_fitting_order([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[True] * 3, None, [True] * 3], 4) == [0, 2, 1]
    assert row_fitting_order([[1], [2]], [None, None], 4) == [0, 1]


def test_packed_rows_with_targets_codes_answers_and_drops_rows_that_score_nothing():
    # rows of 4, chats only (answers: all but the first token): [1 2 3] and [4 5] fit whole; then no plain text is
    # left to fill the gap, so [7 8 9] and [6 6 6] straddle rows and score nothing
    lists = [[1, 2, 3], [4, 5], [7, 8, 9], [6, 6, 6]]
    masks = [[False, True, True], [False, True], [False, True, True], [False, True, True]]
    assert pack(lists, 4, 0).tolist() == [[1, 2, 3, 0], [4, 5, 0, 7], [8, 9, 0, 6]]
    rows, targets = packed_rows_with_targets(lists, masks, 4, 0)
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 7]]  # the third row holds only pieces of straddling chats
    assert targets.tolist() == [[0, 2, 2, 0], [0, 2, 0, 0]]
    # plain text is code 1, its separator included
    rows, targets = packed_rows_with_targets([[1, 2], [5, 6]], [[False, True], None], 3, 0)
    assert rows.tolist() == [[1, 2, 0], [5, 6, 0]] and targets.tolist() == [[0, 2, 0], [1, 1, 1]]


def test_packed_batches_carry_the_loss_mask_rows():
    rows = torch.arange(12).view(6, 2)
    mask = rows % 3 == 0
    batches = PackedBatches(rows, batch_size=4, seed=0, loss_mask=mask)
    for _ in range(3):
        ids, got = batches.next_with_mask()
        assert torch.equal(got, ids % 3 == 0)
    with pytest.raises(ValueError, match=r"loss_mask has shape \(6, 1\), the rows \(6, 2\)"):
        PackedBatches(rows, batch_size=4, seed=0, loss_mask=mask[:, :1])


def test_chat_examples_in_jsonl_files(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"prompt": "Where is the key?", "answer": "Under the mat.", "kind": "chat"}\n{"text": "plain"}\n')
    docs = load_documents([path])
    assert [(d.text, d.answer) for d in docs] == [("Where is the key?", "Under the mat."), ("plain", None)]
    path.write_text('{"messages": [{"role": "user", "content": "Doc. Q1?"}, {"role": "assistant", "content": "A1"}, '
                    '{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A2"}]}\n')
    (doc,) = load_documents([path])
    assert (doc.text, doc.answer, doc.follow_ups) == ("Doc. Q1?", "A1", (("Q2?", "A2"),))
    user, assistant = '{"role": "user", "content": "q"}', '{"role": "assistant", "content": "a"}'
    for content, expected in [('{"prompt": 3, "answer": "x"}', ["line 1", "'prompt' and 'answer'", "int"]),
                              ('{"prompt": "q", "answer": " "}', ["line 1", "'answer' is empty"]),
                              ('{"messages": []}', ["line 1", "non-empty list", "pairs"]),
                              (f'{{"messages": [{user}]}}', ["line 1", "pairs"]),
                              (f'{{"messages": [{assistant}, {user}]}}', ["line 1", "message 0", '"role": "user"']),
                              (f'{{"messages": [{user}, {user}]}}', ["message 1", '"role": "assistant"']),
                              ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
                               ["message 1", "is empty"])]:
        path.write_text(content + "\n")
        with pytest.raises(ValueError) as err:
            load_documents([path])
        assert all(part in str(err.value) for part in expected), str(err.value)


@pytest.mark.real_model
def test_encode_documents_renders_chat_examples_with_the_answer_mask(default_tokenizer):
    docs = [Document("plain", "Some text."), Document("chat", "Where is the key?", answer="Under the mat.")]
    (plain_ids, plain_mask), (chat_ids, chat_mask) = encode_documents(docs, default_tokenizer)
    assert plain_mask is None and plain_ids == default_tokenizer.encode("Some text.", add_special_tokens=False)
    assert (chat_ids, chat_mask) == encode_chat_example(default_tokenizer, "Where is the key?", "Under the mat.")
    assert default_tokenizer.decode([i for i, m in zip(chat_ids, chat_mask) if m]) == "Under the mat.<|im_end|>"
    assert tokenize_documents(docs, default_tokenizer) == [plain_ids, chat_ids]


def test_packed_batches_cover_every_row_once_per_epoch():
    rows = torch.arange(10).unsqueeze(1).repeat(1, 3)
    batches = PackedBatches(rows, batch_size=4, seed=0)
    assert batches.tokens_per_batch == 12
    picked = torch.cat([next(batches)[:, 0] for _ in range(5)]).tolist()  # 20 rows: two epochs
    assert sorted(picked[:10]) == list(range(10)) and sorted(picked[10:]) == list(range(10))
    assert picked[:10] != picked[10:]
    assert batches.state_dict()["epoch"] == 2 and batches.state_dict()["position"] == 0
    other = PackedBatches(rows, batch_size=4, seed=1)
    assert torch.cat([next(other)[:, 0] for _ in range(3)]).tolist()[:10] != picked[:10]
    same_seed = PackedBatches(rows, batch_size=4, seed=0)
    assert torch.cat([next(same_seed)[:, 0] for _ in range(5)]).tolist() == picked


def test_packed_batches_resume_equals_uninterrupted():
    rows = torch.arange(7 * 5).view(7, 5)
    full = PackedBatches(rows, batch_size=3, seed=4)
    expected = [next(full) for _ in range(9)]
    first = PackedBatches(rows, batch_size=3, seed=4)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    assert {"epoch", "position", "seed"} <= set(state)
    resumed = PackedBatches(rows, batch_size=3, seed=999)
    resumed.load_state_dict(state)
    for want, batch in zip(expected[4:], resumed):
        assert torch.equal(batch, want)


def test_packed_batches_state_from_other_data_is_refused():
    state = PackedBatches(torch.zeros(6, 4, dtype=torch.long), 2, 0).state_dict()
    with pytest.raises(ValueError, match="saved for rows=6, these batches have rows=5"):
        PackedBatches(torch.zeros(5, 4, dtype=torch.long), 2, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="saved for seq_len=4, these batches have seq_len=8"):
        PackedBatches(torch.zeros(6, 8, dtype=torch.long), 2, 0).load_state_dict(state)


# ----------------------------------------------------------------------------- synthesis


@pytest.fixture(scope="module")
def tiny_teacher():
    """A random two-layer model over the embedded tokenizer's vocabulary."""
    from reference_impl import randomize_
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    config = SpikingBrainConfig(
        vocab_size=49152, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
        num_hidden_layers=2, layer_mixers=["gla", "swa"], sliding_window=8, pad_token_id=2,
    )
    return randomize_(SpikingBrainForCausalLM(config), seed=0).eval()


@pytest.mark.real_model
def test_synth_is_seeded_stops_at_the_budget_and_keeps_the_callers_rng(tiny_teacher, default_tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    docs = synth_documents(tiny_teacher, default_tokenizer, tokens=40, batch_size=4, max_new_tokens=16, seed=5, progress=False)
    assert torch.equal(torch.rand(1), expected_next)
    # 40 tokens at most 16 per answer: one batch of ceil(40 / 16) = 3 answers, then stop.
    assert len(docs) == 3 and all(d.text.strip() for d in docs)
    again = synth_documents(tiny_teacher, default_tokenizer, tokens=40, batch_size=4, max_new_tokens=16, seed=5, progress=False)
    assert [d.text for d in again] == [d.text for d in docs]
    other = synth_documents(tiny_teacher, default_tokenizer, tokens=40, batch_size=4, max_new_tokens=16, seed=6, progress=False)
    assert [d.text for d in other] != [d.text for d in docs]
    # Answers only: no chat-template text.
    assert not any("<|im_start|>" in d.text or "assistant\n" in d.text for d in docs)


# ----------------------------------------------------------------------------- command line


@pytest.mark.real_model
def test_cli_data_synth_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "synth.jsonl"
    assert main(["data", "synth", "--teacher", "default", "--tokens", "64", str(out), "--batch-size", "2", "--max-new-tokens", "32"]) == 0
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(set(r) == {"text"} and r["text"].strip() for r in records)
    assert [d.text for d in load_documents([out])] == [r["text"] for r in records]
    assert json.loads(capsys.readouterr().out)["documents"] == len(records)
    assert [p.name for p in tmp_path.iterdir()] == ["synth.jsonl"]  # no temporary file left behind


def test_cli_data_split_writes_train_and_held_out(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    for i in range(12):
        (tmp_path / "src" / f"d{i}.txt").write_text(f"document number {i}")
    assert main(["data", "split", str(tmp_path / "src"), "--held-out-fraction", "0.25", "--out", str(tmp_path / "out")]) == 0
    counts = json.loads(capsys.readouterr().out)
    train, held = split_held_out(load_documents([tmp_path / "src"]), 0.25, 0)
    assert len(train) + len(held) == 12
    assert (counts["train_documents"], counts["held_out_documents"]) == (len(train), len(held))
    assert [d.text for d in load_documents([tmp_path / "out" / "train.jsonl"])] == [d.text for d in train]
    held_text = (tmp_path / "out" / "held_out.txt").read_text()
    assert all(d.text in held_text for d in held) and not any(d.text + "\n" in held_text for d in train)


def test_cli_data_errors_exit_2(tmp_path, capsys):
    assert main(["data", "split", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope: no such file or folder" in capsys.readouterr().err
    assert main(["data", "synth", "--tokens", "8", str(tmp_path / "out.txt")]) == 2
    assert "must be a .jsonl file" in capsys.readouterr().err
    assert Counter(p.name for p in tmp_path.iterdir()) == Counter()


def test_split_does_not_depend_on_where_the_folder_lies(tmp_path):
    for root in ("a", "b/c"):
        folder = tmp_path / root
        folder.mkdir(parents=True)
        for i in range(20):
            (folder / f"doc{i}.txt").write_text(f"document {i}")
    splits = [split_held_out(load_documents([tmp_path / root]), 0.3, seed=1) for root in ("a", "b/c")]
    assert [[d.text for d in part] for part in splits[0]] == [[d.text for d in part] for part in splits[1]]
    assert splits[0][1] and splits[0][0]
