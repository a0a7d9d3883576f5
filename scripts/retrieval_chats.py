"""Write synthetic retrieval chats as training data (the data of the reading experiments).

Usage: .venv/bin/python scripts/retrieval_chats.py [--corpus runs/corpus] [--items 900] [--min-chars 700] [--max-chars 3600]
       [--kinds passkey,kv_lookup,fact_in_prose] [--questions 4] [--out runs/exp/retrieval_chat.jsonl]
Each item of ``spikingbrain.train.corpus.retrieval_items`` (pass key, key-value lookup, fact in
prose, or with ``--kinds multi_question`` several facts asked in turn; filler from the corpus's
training documents) becomes one JSON line ``{"name", "prompt", "answer"}`` (``{"name", "messages"}``
for several questions) for a training config's ``data``: the trainer renders it in the model's
chat template and scores the answers only (``train.data.encode_chat_example``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spikingbrain.train.corpus import RETRIEVAL_KINDS, load_corpus, retrieval_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="runs/corpus", help="a folder written by 'spikingbrain data corpus'")
    parser.add_argument("--items", type=int, default=900)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--min-chars", type=int, default=700, help="shortest prompt in characters (about 200 tokens)")
    parser.add_argument("--max-chars", type=int, default=3600, help="longest prompt in characters (about 1000 tokens)")
    parser.add_argument("--kinds", default=",".join(RETRIEVAL_KINDS), help="comma-separated kinds, made in turn")
    parser.add_argument("--questions", type=int, default=4, help="questions per multi_question item")
    parser.add_argument("--out", default="runs/exp/retrieval_chat.jsonl")
    args = parser.parse_args()
    items = retrieval_items(args.items, seed=args.seed, filler_documents=load_corpus(args.corpus, "train"),
                            min_chars=args.min_chars, max_chars=args.max_chars, kinds=args.kinds.split(","),
                            questions=args.questions)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle:
        for index, item in enumerate(items):
            name = f"retrieval/{item['kind']}/{index}"
            record = ({"name": name, "messages": item["messages"]} if "messages" in item
                      else {"name": name, "prompt": item["prompt"], "answer": item["answer"]})
            handle.write(json.dumps(record) + "\n")
    print(f"wrote {len(items)} retrieval chats to {out}")


if __name__ == "__main__":
    main()
