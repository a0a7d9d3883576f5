"""``spikingbrain ask``, ``chat`` and ``serve`` as real subprocesses (piped stdin, a pseudo-terminal, a live port)."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time

import pytest

from spikingbrain.serve.chat import split_document_prompt
from spikingbrain.serve.engine import SamplingParams

GREEDY = ["--temperature", "0", "--threads", "1"]


def spikingbrain(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "spikingbrain.cli", *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def test_ask_saves_then_reuses_the_document_state(tiny_folder, tiny_engine, tmp_path, capsys):
    from spikingbrain.cli import main

    document = tmp_path / "doc.txt"
    document.write_text("The lighthouse keeper counted ships every night and wrote their names in a blue book. " * 6)
    states = tmp_path / "states"
    args = ["ask", "--model", str(tiny_folder), "--doc", str(document), "--state-cache", str(states), "--chunk-size", "16", "--max-tokens", "9", "--json", *GREEDY, "What colour is the book?"]
    assert main(args) == 0  # the first run in this process, the second as a subprocess
    first = capsys.readouterr()
    second = spikingbrain(*args)
    assert second.returncode == 0, second.stderr
    report = [json.loads(run.err.strip().splitlines()[-1]) for run in (first,)] + [json.loads(second.stderr.strip().splitlines()[-1])]
    assert [r["state"] for r in report] == ["saved", "restored"]
    assert report[0]["state_file"] == report[1]["state_file"] and os.path.isfile(report[0]["state_file"])
    assert report[0]["state_constant_size"] is False  # the tiny model has a full-attention layer
    assert "reading" in first.err and "reading" not in second.stderr  # the progress bar of the prefill
    # both answers equal one uninterrupted run of the whole prompt through the engine
    prefix, question = split_document_prompt(tiny_engine, document.read_text(), "What colour is the book?")
    rendered = tiny_engine.render_chat([{"role": "user", "content": document.read_text() + "\n\nWhat colour is the book?"}])
    assert tiny_engine.tokenizer.decode(prefix + question) == rendered
    generation = tiny_engine.start(prefix + question, SamplingParams(temperature=0, max_tokens=9))
    expected = "".join(generation.run())
    assert first.out.strip() == second.stdout.strip() == expected.strip()
    assert report[1]["document_tokens"] == len(prefix) and report[1]["new_tokens"] == len(generation.completion_ids)


@pytest.mark.parametrize(
    "args,message",
    [(["--doc", "nope.txt"], "nope.txt: no such file"), (["--top-p", "0"], "--top-p"), (["--max-tokens", "0"], "--max-tokens")],
)
def test_ask_refuses_bad_options(tiny_folder, args, message, capsys):
    from spikingbrain.cli import main

    assert main(["ask", "--model", str(tiny_folder), *args, "q"]) == 2
    assert message in capsys.readouterr().err


def test_chat_keeps_history_in_the_state_and_saves_it(tiny_folder, tmp_path):
    saved = tmp_path / "talk.safetensors"
    lines = ["Hello there", f"/save {saved}", "And then?", "/reset", "Hello there", f"/load {saved}", "And then?", "/quit"]
    run = spikingbrain("chat", "--model", str(tiny_folder), "--max-tokens", "6", *GREEDY, stdin="\n".join(lines) + "\n")
    assert run.returncode == 0, run.stderr
    answers = run.stdout.splitlines()
    stats = re.findall(r"\[prompt (\d+) tokens \((\d+) from the state\)", run.stderr)
    assert len(answers) == len(stats) == 4
    assert int(stats[0][1]) == 0 and 0 < int(stats[1][1]) < int(stats[1][0])  # the second turn fed only new tokens
    assert answers[2] == answers[0] and int(stats[2][1]) == 0  # after /reset: a fresh conversation
    assert answers[3] == answers[1] and stats[3] == stats[1]  # after /load: the saved one goes on
    assert "[saved" in run.stderr and "[loaded" in run.stderr and saved.is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_with_api_key(tiny_folder):
    from openai import OpenAI

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "spikingbrain.cli", "serve", "--model", str(tiny_folder), "--port", str(port), "--threads", "1"],
        env={**os.environ, "SPIKINGBRAIN_API_KEY": "k1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = ""
        while "serving" not in banner and proc.poll() is None:
            banner = proc.stderr.readline()
        assert f"on http://127.0.0.1:{port}/v1" in banner and "api key required" in banner
        api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                models = api.models.list()
                break
            except Exception:
                assert time.monotonic() < deadline and proc.poll() is None, "server did not come up"
                time.sleep(0.2)
        name = tiny_folder.name
        assert [m.id for m in models.data] == [name]
        reply = api.completions.create(model=name, prompt="One two three", max_tokens=5, temperature=0)
        assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.real_model
def test_chat_in_a_terminal_with_the_embedded_model(default_folder, default_tokenizer):
    import pty

    import torch
    from transformers import AutoModelForCausalLM

    question = "What is the capital of France?"
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "spikingbrain.cli", "chat", "--max-tokens", "12", *GREEDY])
    output = b""

    def read_until(marker: bytes, timeout=240):
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output:
            assert time.monotonic() < deadline, output.decode(errors="replace")
            if select.select([fd], [], [], 1)[0]:
                output += os.read(fd, 4096)

    try:
        read_until(b"> ")
        os.write(fd, (question + "\n").encode())
        read_until(b"tokens/s")
        os.write(fd, b"/quit\n")
        os.waitpid(pid, 0)
    finally:
        os.close(fd)
    ids = default_tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    teacher = AutoModelForCausalLM.from_pretrained(default_folder).eval()
    with torch.no_grad():
        expected = teacher.generate(ids, max_new_tokens=12, do_sample=False)
    answer = default_tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert answer.strip() in output.decode().replace("\r\n", "\n")
