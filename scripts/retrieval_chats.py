"""Write synthetic retrieval chats as plain-text training documents (the data of the reading experiments).

Usage: .venv/bin/python scripts/retrieval_chats.py [--corpus runs/corpus] [--items 900] [--out runs/exp/retrieval_chat.jsonl]
Each item of ``spikingbrain.train.corpus.retrieval_items`` (pass key, key-value lookup, fact in
prose; filler from the corpus's training documents) is rendered as one user turn and the answer
with the embedded model's chat template, one JSON line ``{"name", "text"}`` each, for a training
config's ``data``. The trainer reads such text as plain text (special-token text is split into
ordinary tokens), and scores every position; an answer-only loss on real chat tokens
(``train.corpus.encode_chat_example``) is not wired into the trainer yet.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spikingbrain.model.loading import load_tokenizer
from spikingbrain.train.corpus import load_corpus, retrieval_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="runs/corpus", help="a folder written by 'spikingbrain data corpus'")
    parser.add_argument("--items", type=int, default=900)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--max-chars", type=int, default=3600, help="longest prompt in characters (about 1000 tokens)")
    parser.add_argument("--out", default="runs/exp/retrieval_chat.jsonl")
    args = parser.parse_args()
    tokenizer = load_tokenizer("default")
    items = retrieval_items(args.items, seed=args.seed, filler_documents=load_corpus(args.corpus, "train"),
                            min_chars=700, max_chars=args.max_chars)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle:
        for index, item in enumerate(items):
            turns = [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["answer"]}]
            text = tokenizer.apply_chat_template(turns, tokenize=False)
            handle.write(json.dumps({"name": f"retrieval/{item['kind']}/{index}", "text": text}) + "\n")
    print(f"wrote {len(items)} retrieval chats to {out}")


if __name__ == "__main__":
    main()
