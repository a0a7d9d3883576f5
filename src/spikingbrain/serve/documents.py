"""Documents for the reader page: text out of .txt / .md / .html / .pdf files, and the store of read documents.

A :class:`Document` is read once: its chat-template prefix (template start and text, see
:func:`~spikingbrain.serve.chat.split_document_prompt`) is prefilled in aligned chunks by the
server's scheduler, and the cache after the last token is kept as a :class:`Snapshot`. Every
question then restores a copy of that state and reads only the question's own tokens. The token
ids are kept once, as 32-bit integers (4 MB for a 1M-token document); the text is not kept.
"""

from __future__ import annotations

import array
import codecs
import io
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from html.parser import HTMLParser

from .protocol import APIError
from .snapshot import Snapshot

__all__ = [
    "DocumentError",
    "TEXT_SUFFIXES",
    "HTML_SUFFIXES",
    "extract_text",
    "html_text",
    "pdf_text",
    "Document",
    "DocumentStore",
]

#: File name endings read as plain text and as HTML; ``.pdf`` goes through pypdf.
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text", ".rst", ".csv", ".log")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
SUPPORTED = ".txt, .md, .html or .pdf"


class DocumentError(APIError):
    """A file the reader cannot use (400 ``invalid_document``), naming the file and what to do."""

    def __init__(self, name: str, problem: str, code: str = "invalid_document"):
        super().__init__(400, f"{name}: {problem}", param="file", code=code)


def _suffix(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _decode(name: str, data: bytes) -> str:
    """UTF-8 (or UTF-16 / UTF-32 with a byte-order mark) text of ``data``; binary and undecodable files refused."""
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as err:
                raise DocumentError(name, f"starts with a {codec.upper()} byte-order mark but is not valid {codec.upper()} (byte {err.start}); save it again as UTF-8", "undecodable_document") from None
    nul = data.find(b"\x00", 0, 1 << 16)
    if nul >= 0:
        raise DocumentError(name, f"looks like a binary file (a NUL byte at offset {nul}); open a {SUPPORTED} file", "binary_document")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DocumentError(
            name, f"is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start} cannot be decoded); save it as UTF-8, or open a {SUPPORTED} file", "undecodable_document"
        ) from None


class _TextOfHTML(HTMLParser):
    """Collects the visible text of an HTML page: no scripts or styles, white space collapsed outside ``<pre>``, paragraphs apart."""

    BREAKS = {"br", "li", "tr", "dt", "dd"}
    PARAGRAPHS = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre", "blockquote", "table", "ul", "ol", "hr", "dl", "header", "footer", "main", "nav", "aside", "figure"}
    HIDDEN = {"script", "style", "noscript", "template", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self.hidden = self.pre = 0
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        elif tag in self.HIDDEN:
            self.hidden += 1
        self.pre += tag == "pre"
        if tag in self.BREAKS:
            self.parts.append("\n")
        elif tag in self.PARAGRAPHS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        elif tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.PARAGRAPHS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        elif not self.hidden:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def _tidy(text: str) -> str:
    """Lines stripped of surrounding spaces, runs of blank lines cut to one."""
    lines, blank = [], False
    for line in text.splitlines():
        line = line.strip()
        if line or not blank:
            lines.append(line)
        blank = not line
    return "\n".join(lines).strip()


def html_text(html: str) -> str:
    """The visible text of an HTML page (title first, scripts and styles dropped)."""
    parser = _TextOfHTML()
    parser.feed(html)
    parser.close()
    title = " ".join("".join(parser.title).split())
    body = _tidy("".join(parser.parts))
    return f"{title}\n\n{body}".strip() if title and not body.startswith(title) else body


def pdf_text(name: str, data: bytes) -> str:
    """The text of every page of a PDF file (pypdf), pages separated by blank lines."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError(name, "is an encrypted PDF; save a copy without a password and open that", "encrypted_document")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as err:
        raise DocumentError(name, f"is not a readable PDF ({type(err).__name__}: {err}); open another copy, or export it as text", "unreadable_document") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise DocumentError(name, f"has {len(pages)} page(s) but no extractable text (a scanned image?); run it through OCR, or open a text version", "empty_document")
    return text


def extract_text(name: str, data: bytes) -> str:
    """The text of an uploaded file, by its name's ending (.pdf, .html, anything else read as UTF-8 text).

    Raises :class:`DocumentError` for an empty, binary, undecodable or unreadable file.
    """
    if not data:
        raise DocumentError(name, f"is empty (0 bytes); open a {SUPPORTED} file with some text in it", "empty_document")
    suffix = _suffix(name)
    if suffix == ".pdf" or (not suffix and data.startswith(b"%PDF-")):
        return pdf_text(name, data)
    if data.startswith(b"%PDF-"):
        raise DocumentError(name, "is a PDF file under another name; rename it to end in .pdf", "binary_document")
    text = _decode(name, data)
    if suffix in HTML_SUFFIXES:
        text = html_text(text)
    if not text.strip():
        raise DocumentError(name, f"has no text ({len(data)} bytes of white space or markup only); open a {SUPPORTED} file with some text in it", "empty_document")
    return text


@dataclass
class Document:
    """An uploaded document: its prefix token ids, reading progress, and its kept state once read."""

    name: str
    model: str
    characters: int
    ids: array.array
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    state: str = "reading"  # reading, ready, failed, cancelled
    error: dict | None = None
    tokens_read: int = 0  # prefix tokens read so far by the reading job
    read_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    snapshot: Snapshot | None = None
    questions: int = 0
    document_tokens_reread: int = 0  # over all questions: document tokens read again (0 while the state is kept)
    job: object = None  # the reading job while it runs
    watcher: object = None  # the task that follows it
    last_answer: dict | None = None

    @property
    def tokens(self) -> int:
        """Tokens of the document's prefix (template start and text)."""
        return len(self.ids)

    def progress(self) -> dict:
        """Tokens read, the rate so far and the estimated time left."""
        elapsed = (self.read_seconds if self.state != "reading" else time.monotonic() - self.started) or 1e-9
        rate = self.tokens_read / elapsed
        left = None if self.state != "reading" or rate <= 0 else (self.tokens - self.tokens_read) / rate
        return {
            "state": self.state,
            "tokens_read": self.tokens_read,
            "tokens": self.tokens,
            "tokens_per_second": round(rate, 1),
            "seconds": round(elapsed, 3),
            "seconds_left": None if left is None else round(left, 1),
            "error": self.error,
        }


class DocumentStore:
    """The documents a server holds, at most ``max_documents`` at a time."""

    def __init__(self, max_documents: int = 8):
        self.max_documents = max_documents
        self.documents: dict[str, Document] = {}
        self.lock = threading.Lock()

    def add(self, document: Document) -> None:
        """Keep a new document, refusing one over the limit."""
        with self.lock:
            if len(self.documents) >= self.max_documents:
                raise APIError(429, f"{self.max_documents} documents are open, the most this server keeps; delete one first (DELETE /v1/documents/ID)", "rate_limit_error", code="too_many_documents")
            self.documents[document.id] = document

    def get(self, ident: str) -> Document:
        """The document with id ``ident``, or a 404 naming it."""
        with self.lock:
            document = self.documents.get(ident)
        if document is None:
            raise APIError(404, f"no document with id {ident!r}; list them with GET /v1/documents or upload it again", param="id", code="document_not_found")
        return document

    def remove(self, ident: str) -> Document:
        """Forget a document (its reading job, if any, is cancelled by the caller)."""
        document = self.get(ident)
        with self.lock:
            self.documents.pop(ident, None)
        return document

    def all(self) -> list[Document]:
        """Every document, oldest first."""
        with self.lock:
            return list(self.documents.values())
