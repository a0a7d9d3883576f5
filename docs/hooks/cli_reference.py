"""MkDocs hook: write the CLI reference from the argparse parsers at build time.

A page that contains the line ``<!-- cli-reference -->`` gets, in its place, one section per
command of ``spikingbrain.cli.build_parser()``: the full ``--help`` text of the top-level
command and of every subcommand, found by walking the subparsers. Nothing is copied by hand,
so the page always matches the parsers of the installed package.
"""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- cli-reference -->"
WIDTH = "100"  # argparse wraps help to $COLUMNS; fixed so the page does not depend on the terminal


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, one-line help) of each direct subcommand, in the order they were added."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # an alias of a command already listed
                    continue
                seen.add(id(sub))
                found.append((name, sub, helps.get(name, "")))
    return found


def _walk(parser: argparse.ArgumentParser, path: list[str], help_line: str, out: list) -> None:
    out.append((path, parser, help_line))
    for name, sub, line in _subcommands(parser):
        _walk(sub, path + [name], line, out)


def commands() -> list[tuple[list[str], argparse.ArgumentParser, str]]:
    """Every command of the ``spikingbrain`` parser: (words after ``spikingbrain``, parser, one-line help)."""
    from spikingbrain.cli import build_parser

    out: list = []
    _walk(build_parser(), [], "", out)
    return out


def _fence(text: str) -> str:
    return "```text\n" + text.rstrip() + "\n```\n"


def render() -> str:
    """Markdown of the whole reference: a table of commands, then each command's help text."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        found = commands()
        lines = ["| command | what it does |", "|---|---|"]
        for path, _, help_line in found[1:]:
            name = " ".join(["spikingbrain", *path])
            anchor = "-".join(["spikingbrain", *path])
            lines.append(f"| [`{name}`](#{anchor}) | {help_line.replace('|', '/')} |")
        sections = ["\n".join(lines) + "\n"]
        for path, parser, _ in found:
            name = " ".join(["spikingbrain", *path])
            anchor = "-".join(["spikingbrain", *path])
            level = "#" * min(2 + max(len(path) - 1, 0), 4)
            sections.append(f"{level} `{name}` {{#{anchor}}}\n\n{_fence(parser.format_help())}")
        return "\n".join(sections)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
