"""MkDocs hook: expand ``<!-- api-modules: NAME -->`` into mkdocstrings blocks, one per module.

The modules are found at build time from the files under ``src/``, so a module that is added,
moved or removed needs no edit of the pages. The package's own docstring comes first, then each
module (and each subpackage's modules, recursively) in file-name order, each with its public
members. Re-exports in a package's ``__init__`` are not repeated: they appear under the module
that defines them.

The docstrings are written as plain text with reStructuredText-style literals, not for
mkdocstrings' cross-references, so a bracket pair such as ``[user: prompt][assistant: answer]``
in a docstring reads to Markdown as a reference link that cannot be resolved. Those messages
(and only those: the reference was written in a file under ``src/``) are logged as information
instead of warnings, so that ``mkdocs build --strict`` does not fail on prose; a broken
reference in the pages themselves still fails the build.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MARKER = re.compile(r"^<!-- api-modules: ([\w.]+) -->$", re.MULTILINE)
AUTOREFS_LOGGER = "mkdocs.plugins.mkdocs_autorefs._internal.plugin"


class _DocstringBrackets(logging.Filter):
    """Downgrade autorefs' unresolved-reference warnings that come from docstrings under src/."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno == logging.WARNING and "Could not find cross-reference target" in message \
                and f"from {SRC}" in message:
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def on_startup(command, dirty) -> None:
    logger = logging.getLogger(AUTOREFS_LOGGER)
    if not any(isinstance(f, _DocstringBrackets) for f in logger.filters):
        logger.addFilter(_DocstringBrackets())


def modules(package: str) -> list[str]:
    """Dotted names of the public modules in ``package`` (a folder under src/), recursively, sorted."""
    folder = SRC.joinpath(*package.split("."))
    if not (folder / "__init__.py").is_file():
        raise FileNotFoundError(f"api reference: {package} is not a package under {SRC}")
    names = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("_"):
            continue
        if path.suffix == ".py":
            names.append(f"{package}.{path.stem}")
        elif path.is_dir() and (path / "__init__.py").is_file():
            names.append(f"{package}.{path.name}")
            names.extend(modules(f"{package}.{path.name}"))
    return names


def blocks(package: str) -> str:
    """Markdown with one ``:::`` block for the package docstring and one per module (one block for a module)."""
    if SRC.joinpath(*package.split(".")).with_suffix(".py").is_file():
        return f"::: {package}\n    options:\n      show_root_heading: true\n"
    out = [f"::: {package}\n    options:\n      members: false\n      show_root_heading: false\n"]
    for name in modules(package):
        if SRC.joinpath(*name.split("."), "__init__.py").is_file():  # a subpackage: its docstring only
            out.append(f"::: {name}\n    options:\n      members: false\n      show_root_heading: true\n")
        else:
            out.append(f"::: {name}\n    options:\n      show_root_heading: true\n      show_submodules: false\n")
    return "\n".join(out)


LAYOUT_MARKER = "<!-- code-layout -->"


def _summary(path: Path) -> str:
    """First sentence-line of a module's docstring (read with ast: nothing is imported)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.strip().split("\n")[0].replace("|", "/")


def layout() -> str:
    """A table of every module under src/spikingbrain with the first line of its docstring."""
    rows = ["| module | what it is |", "|---|---|"]
    for path in sorted((SRC / "spikingbrain").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if any(part.startswith("_") and part != "__init__" for part in parts) or parts[-1] == "__main__":
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        rows.append(f"| `{name}` | {_summary(path)} |")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if LAYOUT_MARKER in markdown:
        markdown = markdown.replace(LAYOUT_MARKER, layout())
    return MARKER.sub(lambda match: blocks(match.group(1)), markdown)
