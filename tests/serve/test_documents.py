"""Text out of uploaded files (txt, md, html, pdf; empty, binary, undecodable) and the KV-cache arithmetic of the reader page."""

from __future__ import annotations

import codecs
import io

import pytest

from spikingbrain.model.info import kv_cache_bytes
from spikingbrain.serve.documents import DocumentError, extract_text


def handwritten_pdf(pages: list[str]) -> bytes:
    """A minimal PDF (one Helvetica text line per page), with a correct cross-reference table, written by hand."""
    count = len(pages)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(count)), count), b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        stream = b"BT /F1 18 Tf 72 720 Td (%s) Tj ET" % text.encode("latin-1")
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (5 + 2 * i))
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def test_plain_text_and_markdown_come_through_unchanged():
    text = "# Minutes\n\nThe ferry is named *Northern Star*.\nCafé, naïve, 東京.\n"
    assert extract_text("notes.md", text.encode()) == text
    assert extract_text("notes.txt", text.encode()) == text
    assert extract_text("README", text.encode()) == text  # no ending: read as text


def test_byte_order_marks_choose_the_encoding():
    text = "Budget: 48,000 euros — approved."
    assert extract_text("a.txt", codecs.BOM_UTF8 + text.encode()) == text
    assert extract_text("b.txt", text.encode("utf-16")) == text  # Python writes the BOM
    assert extract_text("c.txt", codecs.BOM_UTF16_BE + text.encode("utf-16-be")) == text


def test_html_gives_the_visible_text_only():
    html = """<!doctype html><html><head><title>Harbour minutes</title><style>p { color: red }</style>
    <script>var secret = "do not read";</script></head><body><h1>Minutes</h1><p>The ferry is named
    <b>Northern Star</b>.</p><ul><li>Budget: 48,000 &euro;</li><li>Next: 7 April</li></ul><noscript>enable js</noscript></body></html>"""
    assert extract_text("page.html", html.encode()) == "Harbour minutes\n\nMinutes\n\nThe ferry is named Northern Star.\n\nBudget: 48,000 €\nNext: 7 April"


def test_pdf_text_of_every_page():
    data = handwritten_pdf(["The ferry is named Northern Star.", "The budget is 48,000 euros."])
    text = extract_text("minutes.pdf", data)
    assert "The ferry is named Northern Star." in text and "The budget is 48,000 euros." in text
    assert text.index("Northern") < text.index("budget")


def test_pdf_without_text_and_broken_pdf_are_refused():
    from pypdf import PdfWriter

    blank = io.BytesIO()
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    writer.write(blank)
    with pytest.raises(DocumentError, match=r"scan\.pdf: has 1 page\(s\) but no extractable text.*OCR") as err:
        extract_text("scan.pdf", blank.getvalue())
    assert err.value.code == "empty_document" and err.value.status == 400
    with pytest.raises(DocumentError, match=r"broken\.pdf: is not a readable PDF") as err:
        extract_text("broken.pdf", b"%PDF-1.4\nnot really a pdf at all")
    assert err.value.code == "unreadable_document"


@pytest.mark.parametrize(
    "name, data, code, words",
    [
        ("empty.txt", b"", "empty_document", "is empty (0 bytes)"),
        ("blank.md", b"  \n\n\t ", "empty_document", "has no text"),
        ("markup.html", b"<html><script>x()</script></html>", "empty_document", "has no text"),
        ("photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01", "binary_document", "looks like a binary file (a NUL byte at offset 4)"),
        ("program", b"\x7fELF\x02\x01\x01\x00\x00", "binary_document", "binary"),
        ("latin.txt", "café au lait".encode("latin-1"), "undecodable_document", "byte 0xe9 at offset 3"),
        ("report.txt", b"%PDF-1.7\n...", "binary_document", "rename it to end in .pdf"),
    ],
)
def test_unusable_files_get_an_error_naming_the_file_and_the_fix(name, data, code, words):
    with pytest.raises(DocumentError) as err:
        extract_text(name, data)
    assert err.value.code == code and err.value.status == 400 and err.value.param == "file"
    assert err.value.message.startswith(f"{name}: ") and words in err.value.message
    assert any(fix in err.value.message for fix in ("open a", "save it", "rename"))


def test_kv_cache_bytes_against_a_hand_computation():
    from spikingbrain import SpikingBrainConfig

    # SmolLM2-135M: 30 layers, 3 KV heads of 64 channels; 1,000 tokens in fp32:
    # 30 * 2 * 3 * 64 * 1000 * 4 = 46,080,000 bytes; 2**20 tokens in bf16: 11,520 * 2**20 * 2 = 24,159,191,040 bytes.
    config = SpikingBrainConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, layer_mixers=["full"] * 30)
    assert kv_cache_bytes(config, 1000, 4) == 46_080_000
    assert kv_cache_bytes(config, 2**20, 2) == 24_159_191_040
    assert kv_cache_bytes(config, 0, 4) == 0
