"""The reader page in a real headless Chromium against ``spikingbrain serve``: a document, two questions, a binary file.

Usage:
  python benchmarks/reader_page.py [--model default] [--api-key KEY] [--spiking K] [--document FILE]
      [--question Q --question Q2 ...] [--screenshot docs/img/reader.png] [--json docs/reader-page.json]

``spikingbrain serve`` runs as its own process (with ``--api-key``, through SPIKINGBRAIN_API_KEY).
Chromium is the system's (``/usr/bin/chromium``, or SPIKINGBRAIN_CHROMIUM), driven by Playwright
with its own empty profile; nothing is downloaded. The script opens the page, enters the key when
the page asks for it, opens the document, asks each question and waits for its answer, takes the
screenshot, opens a binary file and reads the page's error, drops a second document on the page
and switches back to the first, and drops a long one that it cancels while it is read. The record holds what the page
showed (answers, the line under each answer, the panel, the error), the server's own counters
for the document, the reading speed and each answer's time to first token, with the machine's
load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from serve_hostile_load import call, start_server

from spikingbrain.runtime.machine import load_average, machine_info
from spikingbrain.runtime.records import write_json

MINUTES = """Minutes of the harbour committee, 3 March.
The committee met in the old lighthouse. Present: Maria Lopez (chair), Tom Berg, Aiko Sato.
The new ferry will be named Northern Star. It will start sailing on 12 June.
The budget for the repairs of the pier is 48,000 euros.
Tom Berg will write to the city council about the parking places.
The next meeting is on 7 April.
"""
QUESTIONS = ["What will the new ferry be named?", "What is the budget for the repairs of the pier?"]
#: Flags for Chromium as root in a container, with nothing reaching out to the network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 300_000


def chromium_path() -> str:
    """The system Chromium, with the command that installs it when it is missing."""
    path = os.environ.get("SPIKINGBRAIN_CHROMIUM", "/usr/bin/chromium")
    if not Path(path).is_file():
        raise SystemExit(f"reader_page: no Chromium at {path}; install it with 'sudo scripts/install_browser.sh' (Debian: apt-get install chromium), or set SPIKINGBRAIN_CHROMIUM")
    return path


def get(port: int, path: str, key: str | None) -> dict:
    """A JSON GET with the key, if any."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        response = conn.getresponse()
        return json.loads(response.read())
    finally:
        conn.close()


def drive(page, base_url: str, port: int, key: str | None, document: Path, questions: list[str], screenshot: Path | None) -> dict:
    """Go through the page as a user does; what it showed and what the server counted."""
    from playwright.sync_api import expect

    record: dict = {"page_errors": []}
    page.on("pageerror", lambda err: record["page_errors"].append(str(err)))
    page.goto(base_url + "/")
    if key:
        expect(page.locator("#key-form")).to_be_visible(timeout=WAIT_MS)
        record["key_prompt"] = page.locator("#error").inner_text()
        page.fill("#key", key)
        page.click("#key-form button")
        expect(page.locator("#key-form")).to_be_hidden(timeout=WAIT_MS)
    expect(page.locator("#model option")).to_have_count(1, timeout=WAIT_MS)
    record["models"] = page.locator("#model option").all_inner_texts()
    page.set_input_files("#file", str(document))
    expect(page.locator("#question")).to_be_enabled(timeout=WAIT_MS)
    record["document_status"] = page.locator("#document-status").inner_text()
    ident = get(port, "/v1/documents", key)["data"][-1]["id"]
    record["document_after_reading"] = get(port, f"/v1/documents/{ident}", key)
    record["answers"] = []
    for i, question in enumerate(questions):
        page.fill("#question", question)
        page.click("#ask")
        answer = page.locator(".message.assistant").nth(i)
        expect(answer.locator(".meta")).to_contain_text("first token", timeout=WAIT_MS)
        server = get(port, f"/v1/documents/{ident}", key)
        record["answers"].append({
            "question": question,
            "page_text": answer.inner_text(),
            "page_meta": answer.locator(".meta").inner_text(),
            "panel": {name: page.locator(f"#{name}").inner_text() for name in ("ttft", "reread", "speed", "state-size", "kv-size", "memory-note", "firing")},
            "server_answer": server["last_answer"],
        })
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    record["document_after_questions"] = get(port, f"/v1/documents/{ident}", key)
    binary = document.with_name("photo.jpg")
    binary.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00" + bytes(range(256)) * 8)
    page.set_input_files("#file", str(binary))
    expect(page.locator("#error")).to_be_visible(timeout=WAIT_MS)
    record["binary_error"] = page.locator("#error").inner_text()
    record["documents_listed"] = page.locator("#documents li").count()
    # a second document dropped on the drop zone, then back to the first one
    drop(page, "agenda.md", "# Agenda\n\nThe harbour festival is on 21 June.\n")
    expect(page.locator("#documents li")).to_have_count(2, timeout=WAIT_MS)
    expect(page.locator("#question")).to_be_enabled(timeout=WAIT_MS)
    record["dropped_document_status"] = page.locator("#document-status").inner_text()
    page.locator("#documents li").first.click()
    record["after_switching_back"] = {"status": page.locator("#document-status").inner_text(), "messages": page.locator(".message").count()}
    # a long document, cancelled while it is read
    drop(page, "long.txt", MINUTES * 50)
    expect(page.locator("#reading-text")).to_have_text(re.compile(r"reading long\.txt: [1-9][\d,]* of [\d,]+ tokens, [\d,]+ tokens/s"), timeout=WAIT_MS)
    record["progress_text"] = page.locator("#reading-text").inner_text()
    page.click("#cancel")
    expect(page.locator("#documents li")).to_have_count(2, timeout=WAIT_MS)
    record["documents_on_server_after_cancel"] = [d["name"] for d in get(port, "/v1/documents", key)["data"]]
    return record


def drop(page, name: str, text: str) -> None:
    """Drop a text file named ``name`` on the page's drop zone, as a file dragged from the desktop."""
    page.evaluate(
        """([name, text]) => {
            const data = new DataTransfer();
            data.items.add(new File([text], name, { type: "text/plain" }));
            document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
        }""",
        [name, text],
    )


def run(args) -> dict:
    """Start the server and the browser, go through the page, and return the record."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    questions = args.question or QUESTIONS
    with tempfile.TemporaryDirectory() as scratch:
        document = Path(scratch) / ("minutes.txt" if args.document is None else Path(args.document).name)
        document.write_bytes(MINUTES.encode() if args.document is None else Path(args.document).read_bytes())
        os.environ["SPIKINGBRAIN_API_KEY"] = args.api_key or ""
        load_before = load_average()
        proc, port = start_server(args.model, args.model, 600.0, 30.0, () if args.spiking is None else ("--spiking", str(args.spiking)))
        try:
            with sync_playwright() as playwright:
                context = playwright.chromium.launch_persistent_context(
                    str(Path(scratch) / "profile"), executable_path=executable, args=CHROMIUM_FLAGS, headless=True, viewport={"width": 1280, "height": 800}
                )
                try:
                    started = time.perf_counter()
                    record = drive(context.new_page(), f"http://127.0.0.1:{port}", port, args.api_key, document, questions, None if args.screenshot is None else Path(args.screenshot))
                    record["seconds"] = round(time.perf_counter() - started, 2)
                finally:
                    context.close()
            deadline = time.monotonic() + 60  # the cancelled reading leaves at the scheduler's next turn
            while (health := json.loads(call(port, "GET", "/health", None, 30)[1]))["active"] and time.monotonic() < deadline:
                time.sleep(0.1)
            record["health"] = health
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    read = record["document_after_reading"]
    record.update(
        model=args.model,
        spiking=args.spiking,
        chromium=executable,
        reading={"tokens": read["tokens"], "seconds": read["seconds"], "tokens_per_second": read["tokens_per_second"]},
        ttft_seconds=[a["server_answer"]["ttft_seconds"] for a in record["answers"]],
        load_average_before=load_before,
        load_average_after=load_average(),
        machine=machine_info(),
    )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="model folder or short name for 'spikingbrain serve'")
    parser.add_argument("--api-key", default=None, help="start the server with this key; the page must ask for it")
    parser.add_argument("--document", default=None, help="the document to open (default: a short meeting record)")
    parser.add_argument("--question", action="append", default=[], help="a question to ask (repeatable; default: two about the meeting)")
    parser.add_argument("--spiking", type=float, default=None, metavar="K", help="serve the model spiking (the panel then shows per-layer firing)")
    parser.add_argument("--screenshot", default=None, help="PNG of the whole page after the questions")
    parser.add_argument("--json", default=None, help="write the record here")
    args = parser.parse_args(argv)
    record = run(args)
    if args.json:
        write_json(args.json, record)
    reading = record["reading"]
    print(f"read {reading['tokens']} tokens in {reading['seconds']} s ({reading['tokens_per_second']} tokens/s); time to first token per question: {record['ttft_seconds']}")
    for answer in record["answers"]:
        print(f"{answer['question']} -> {answer['server_answer']['text']!r} [{answer['page_meta']}]")
    print(f"binary file: {record['binary_error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
