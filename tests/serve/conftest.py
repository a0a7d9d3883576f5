"""Fixtures of the serving tests: a tiny random hybrid model with the embedded tokenizer, and a live server."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from model.conftest import TINY
from reference_impl import randomize_

#: A tiny GLA / sliding-window / full-attention model that reads the embedded model's vocabulary.
TINY_SERVE = {**TINY, "vocab_size": 49152, "sliding_window": 6, "gla_chunk_size": 8, "pad_token_id": 2, "eos_token_id": 2, "bos_token_id": 1}


def make_tiny(layer_mixers=("gla", "swa", "full"), seed: int = 0, **overrides):
    """A fp32 eval-mode SpikingBrain model with seeded random weights and the embedded vocabulary."""
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    config = SpikingBrainConfig(num_hidden_layers=len(layer_mixers), layer_mixers=list(layer_mixers), **{**TINY_SERVE, **overrides})
    return randomize_(SpikingBrainForCausalLM(config), seed).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the shared 2-core machine runs other jobs, and results must not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, default_folder) -> Path:
    """A saved tiny model folder with the embedded model's tokenizer and chat template."""
    from spikingbrain.model.checkpoint import copy_tokenizer_files

    folder = tmp_path_factory.mktemp("tiny-serve")
    make_tiny().save_pretrained(folder)
    copy_tokenizer_files(default_folder, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_engine(tiny_folder):
    """An Engine over the tiny folder with 16-token prefill chunks."""
    from spikingbrain.model.loading import load_model, load_tokenizer
    from spikingbrain.serve.engine import Engine

    return Engine(load_model(tiny_folder), load_tokenizer(tiny_folder), "tiny", chunk_size=16)


@pytest.fixture
def live_server():
    """``start(engine, settings) -> base_url``: a real uvicorn server on a free loopback port, stopped after the test."""
    import uvicorn

    from spikingbrain.serve.server import create_app

    running = []

    def start(engine, settings=None) -> str:
        app = create_app(engine, settings)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        running.append((server, thread, sock))
        app.state.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return app

    yield start
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def served_tiny(tiny_folder):
    """``spikingbrain serve`` on the tiny folder as its own process (model name 'tiny', small limits): (base_url, pid)."""
    import os
    import subprocess
    import sys
    import urllib.request

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    limits = ["--max-tokens-limit", "8", "--default-max-tokens", "4", "--max-prompt-tokens", "256", "--max-body-bytes", "65536"]
    timeouts = ["--request-timeout", "20", "--body-timeout", "5", "--cache-mib", "16"]
    command = [sys.executable, "-m", "spikingbrain.cli", "serve", "--model", str(tiny_folder), "--served-model-name", "tiny", "--port", str(port)]
    proc = subprocess.Popen([*command, "--threads", "1", "--chunk-size", "16", *limits, *timeouts], env={**os.environ, "SPIKINGBRAIN_API_KEY": ""})
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(base_url + "/health", timeout=5).read()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not come up"
            time.sleep(0.2)
    yield base_url, proc.pid
    proc.terminate()
    proc.wait(timeout=30)
