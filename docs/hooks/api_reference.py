"""MkDocs hook: expand ``<!-- api-modules: PACKAGE -->`` into mkdocstrings blocks, one per module.

The modules are found at build time from the files under ``src/``, so a module that is added,
moved or removed needs no edit of the pages. The package's own docstring comes first, then each
module (and each subpackage's modules, recursively) in file-name order, each with its public
members. Re-exports in a package's ``__init__`` are not repeated: they appear under the module
that defines them.
"""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MARKER = re.compile(r"^<!-- api-modules: ([\w.]+) -->$", re.MULTILINE)


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
    """Markdown with one ``:::`` block for the package docstring and one per module."""
    out = [f"::: {package}\n    options:\n      members: false\n      show_root_heading: false\n"]
    for name in modules(package):
        if SRC.joinpath(*name.split("."), "__init__.py").is_file():  # a subpackage: its docstring only
            out.append(f"::: {name}\n    options:\n      members: false\n      show_root_heading: true\n")
        else:
            out.append(f"::: {name}\n    options:\n      show_root_heading: true\n      show_submodules: false\n")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda match: blocks(match.group(1)), markdown)
