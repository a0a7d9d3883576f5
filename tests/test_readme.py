"""The commands written in README.md and docs/*.md still exist, and the cheap ones run.

Every shell block (``sh``, ``bash``, ``console``, ``shell``) of the README and of the
documentation pages is read; each ``spikingbrain ...`` command in it (also ``python -m
spikingbrain.cli ...`` and ``torchrun ... -m spikingbrain.cli ...``) is parsed by the real
argument parser, so that a subcommand or flag that no longer exists fails here (argparse exits
with status 2). ``make`` targets, ``python benchmarks/...`` scripts and ``configs/...`` files
that the commands name must exist. A few commands run for real in a subprocess through the
installed ``spikingbrain`` command: ``--help``, ``info --preset``, ``data split`` and, with the
embedded model, the README's perplexity command, whose result the docs quote. The ``python``
blocks must compile, and every name they import from ``spikingbrain`` must exist.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # docs/demo/report.md is a generated report, not a page
SHELL = {"sh", "bash", "console", "shell", "shell-session"}
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w-]*)\s*$")


@dataclass(frozen=True)
class Command:
    """One command line of a shell block: where it is written and its words."""

    path: Path
    line: int
    argv: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def spikingbrain_args(self) -> tuple[str, ...] | None:
        """The arguments given to the ``spikingbrain`` command, or None when it is another program."""
        argv = self.argv
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):  # VAR=value before the program
            argv = argv[1:]
        if not argv:
            return None
        if Path(argv[0]).name == "spikingbrain":
            return argv[1:]
        for i in range(len(argv) - 1):
            if argv[i] == "-m" and argv[i + 1] == "spikingbrain.cli":
                return argv[i + 2 :]
        return None


def shell_blocks(text: str):
    """(first line number, language, body lines) of every fenced block, indented ones included."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        start = FENCE.match(lines[i])
        if not start:
            i += 1
            continue
        indent, ticks, lang = start.groups()
        body, j = [], i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        yield i + 2, lang.lower(), body
        i = j + 1


def commands_of(path: Path) -> list[Command]:
    """Every command line in the shell blocks of ``path`` (continuations joined, comments dropped)."""
    found = []
    for first, lang, body in shell_blocks(path.read_text(encoding="utf-8")):
        if lang not in SHELL:
            continue
        k, heredoc = 0, None
        while k < len(body):
            number, line = first + k, body[k]
            k += 1
            if heredoc is not None:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            if lang in ("console", "shell-session"):
                if not line.startswith("$ "):
                    continue  # output, not a command
                line = line[2:]
            while line.rstrip().endswith("\\") and k < len(body):
                line = line.rstrip()[:-1] + " " + body[k].strip()
                k += 1
            marker = re.search(r"<<-?\s*'?\"?(\w+)", line)
            if marker:
                heredoc = marker.group(1)
            argv = shlex.split(line, comments=True)
            if argv:
                found.append(Command(path, number, tuple(argv)))
    return found


ALL = [command for page in PAGES for command in commands_of(page)]
CLI_COMMANDS = [command for command in ALL if command.spikingbrain_args is not None]
README_COMMANDS = [command for command in CLI_COMMANDS if command.path == README]


def cli() -> list[str]:
    """The installed ``spikingbrain`` command (beside this interpreter), as the README runs it."""
    script = Path(sys.executable).with_name("spikingbrain")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "spikingbrain.cli"]


def run(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*cli(), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def readme_command(*prefix: str) -> Command:
    """The README command whose arguments start with ``prefix`` (the test fails if the README lost it)."""
    for command in README_COMMANDS:
        if command.spikingbrain_args[: len(prefix)] == prefix:
            return command
    raise AssertionError(f"README.md has no 'spikingbrain {' '.join(prefix)} ...' command any more; update this test")


@pytest.fixture(scope="module")
def parser():
    from spikingbrain.cli import build_parser

    return build_parser()


def test_the_docs_have_commands():
    assert len(README_COMMANDS) >= 5, "the README's tour should show the main commands"
    assert {page.name for page in PAGES} >= {"README.md", "tutorial.md", "conversion.md", "serving.md"}
    assert all(command.path.name in {page.name for page in PAGES} for command in CLI_COMMANDS)
    tutorial = [c.spikingbrain_args[0] for c in CLI_COMMANDS if c.path.name == "tutorial.md"]
    assert {"convert", "train", "ask"} <= set(tutorial), "the tutorial goes convert -> train -> ask"


@pytest.mark.parametrize("command", CLI_COMMANDS, ids=[c.where for c in CLI_COMMANDS])
def test_command_parses(parser, command):
    """The real parser accepts the command: every subcommand and flag it names exists."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(list(command.spikingbrain_args))
    except SystemExit as stop:
        assert stop.code in (0, None), (
            f"{command.where}: 'spikingbrain {shlex.join(command.spikingbrain_args)}' is refused by the CLI:\n"
            + errors.getvalue()
        )


def test_named_files_exist():
    """Make targets, benchmark scripts and config files that the documented commands name."""
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    problems = []
    for command in ALL:
        argv = command.argv
        if argv[0] == "make":
            problems += [f"{command.where}: make {t}" for t in argv[1:] if "=" not in t and t not in targets]
        for word in argv:
            if re.match(r"^(benchmarks|configs|scripts)/[\w./-]+\.(py|yaml|toml|sh)$", word) and not (ROOT / word).is_file():
                problems.append(f"{command.where}: {word}")
    assert not problems, "documented commands name files or targets that do not exist:\n" + "\n".join(problems)


def test_top_level_help_lists_the_documented_commands():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    used = {command.spikingbrain_args[0] for command in CLI_COMMANDS if command.spikingbrain_args}
    missing = [name for name in sorted(used) if name not in result.stdout]
    assert not missing, f"'spikingbrain --help' does not list {missing}"


def test_readme_subcommands_help():
    """``spikingbrain SUBCOMMAND --help`` runs for every (sub)command the README uses."""
    paths = set()
    for command in README_COMMANDS:
        args = command.spikingbrain_args
        depth = 2 if args and args[0] in ("bench", "eval", "data") else 1
        paths.add(tuple(args[:depth]))
    for path in sorted(paths):
        result = run(*path, "--help")
        assert result.returncode == 0 and "usage: spikingbrain" in result.stdout, (path, result.stderr)


def test_readme_info_preset_runs():
    """The README's ``info --preset spikingbrain-76b --json`` prints the counts that the docs quote."""
    command = readme_command("info", "--preset", "spikingbrain-76b")
    result = run(*command.spikingbrain_args)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    models_page = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    total, active = f"{info['parameters']:,}", f"{info['active_parameters']:,}"
    assert f"{total} / {active}" in models_page, f"docs/models.md should give the 76B's counts as {total} / {active}"


def test_long_context_info_runs():
    for command in CLI_COMMANDS:
        if command.path.name == "long-context.md" and command.spikingbrain_args[:2] == ("info", "--preset"):
            result = run(*command.spikingbrain_args)
            assert result.returncode == 0, result.stderr
            assert "state_bytes_per_sequence" in result.stdout
            return
    raise AssertionError("docs/long-context.md has no 'spikingbrain info --preset' command any more")


def test_readme_data_split_runs(tmp_path):
    """The README's held-out split, run in an empty folder: the files its other commands read appear."""
    command = readme_command("data", "split")
    result = run(*command.spikingbrain_args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / command.spikingbrain_args[command.spikingbrain_args.index("--out") + 1]
    assert (out / "train.jsonl").is_file() and (out / "held_out.txt").stat().st_size > 0


@pytest.mark.real_model
def test_readme_teacher_perplexity_matches_the_docs(tmp_path, default_folder):
    """The README's perplexity of the teacher on the held-out split is the 10.99 that docs/evaluation.md gives."""
    split = readme_command("data", "split")
    assert run(*split.spikingbrain_args, cwd=tmp_path).returncode == 0
    command = readme_command("eval", "ppl", "--model", "default")
    result = run(*command.spikingbrain_args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    score = json.loads(result.stdout)
    page = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    assert f"ppl {score['ppl']:.2f}" in page and f"{score['tokens']} tokens" in page, score


PYTHON_BLOCKS = [
    (page, first, "\n".join(body))
    for page in PAGES
    for first, lang, body in shell_blocks(page.read_text(encoding="utf-8"))
    if lang == "python"
]


@pytest.mark.parametrize(
    "page, first, code", PYTHON_BLOCKS, ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _ in PYTHON_BLOCKS]
)
def test_python_example_imports_exist(page, first, code):
    """Every Python example compiles, and every name it imports from spikingbrain exists."""
    import ast
    import importlib

    tree = ast.parse(code, filename=f"{page.name}:{first}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "spikingbrain":
            module = importlib.import_module(node.module)
            missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
            assert not missing, f"{page.name}:{first + node.lineno - 1}: {node.module} has no {missing}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "spikingbrain":
                    importlib.import_module(alias.name)
