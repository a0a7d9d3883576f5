"""Continuous batching: batched answers equal solo answers, disconnects leave the batch, prefill chunks interleave with decoding."""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import math
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from spikingbrain.serve.engine import Engine, SamplingParams
from spikingbrain.serve.scheduler import Job, PrefixCache, Scheduler
from spikingbrain.serve.server import ServerSettings

from .test_server import alone, client


def run_alone(engine: Engine, ids: list[int], params: SamplingParams):
    """The reference: one generation run to its end on its own."""
    generation = engine.start(ids, params)
    "".join(generation.run())
    return generation


def same_bits(a, b) -> bool:
    """Whether two generations produced the same tokens and bit-identical caches."""
    tensors = [[t for layer in g.cache.layers for t in layer.tensors().values()] for g in (a, b)]
    return a.all_ids == b.all_ids and all(torch.equal(x, y) for x, y in zip(*tensors, strict=True))


def served_together(engine: Engine, requests: list[tuple[int, list[int], SamplingParams]]) -> list:
    """Generations run as the scheduler runs them: request ``i`` joins at decode step ``requests[i][0]``; every step decodes all
    decoding generations in one batched call and then reads one prefill chunk of one prompt, the prompts taking turns."""
    waiting, active, finished, step, rows_per_step = sorted(requests, key=lambda r: r[0]), [], {}, 0, []
    generations = {}
    while waiting or active:
        while waiting and waiting[0][0] <= step:
            joins, ids, params = waiting.pop(0)
            generations[joins] = engine.start(ids, params)
            active.append(generations[joins])
        decoding = [g for g in active if not g.prefilling]
        if decoding:
            engine.decode(decoding)
            rows_per_step.append(len(decoding))
        reading = next((g for g in active if g.prefilling), None)
        if reading is not None:
            reading.prefill_chunk()
            active.remove(reading)
            active.append(reading)
        for g in [g for g in active if g.done]:
            active.remove(g)
            finished[id(g)] = step
        step += 1
    assert max(rows_per_step) >= 3, "the schedule batches several rows at once"
    assert len(set(finished.values())) >= 3, "requests leave at different steps"
    return [generations[r[0]] for r in requests]


@pytest.mark.real_model
def test_batched_greedy_equals_solo_on_the_embedded_model(default_folder):
    from spikingbrain.model.loading import load_model, load_tokenizer

    engine = Engine(load_model(default_folder), load_tokenizer(default_folder), "default", chunk_size=16)
    questions = ["What is the capital of France?", "Name three colours.", "Write one sentence about the sea and the wind at night.", "Hi"]
    prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == len(prompts)
    greedy = [SamplingParams(temperature=0, max_tokens=n) for n in (9, 14, 6, 11)]
    solo = [run_alone(engine, ids, p) for ids, p in zip(prompts, greedy)]
    together = served_together(engine, [(0, prompts[0], greedy[0]), (2, prompts[1], greedy[1]), (3, prompts[2], greedy[2]), (7, prompts[3], greedy[3])])
    assert [(g.text, g.finish_reason) for g in together] == [(g.text, g.finish_reason) for g in solo]
    assert all(same_bits(a, b) for a, b in zip(together, solo)), "every key and value of every row equals its solo run, bit for bit"
    assert "Paris" in together[0].text


def test_seeded_sampling_is_reproducible_in_a_batch(tiny_engine):
    prompts = [tiny_engine.encode_text(t) for t in ("Once upon a time", "The weather today is " * 5, "A", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12")]
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=40 + i, max_tokens=6 + 3 * i) for i in range(4)]
    solo = [run_alone(tiny_engine, ids, p) for ids, p in zip(prompts, params)]
    for joins in ((0, 1, 2, 3), (5, 0, 3, 1)):
        together = served_together(tiny_engine, [(j, ids, p) for j, ids, p in zip(joins, prompts, params)])
        assert [(g.text, g.finish_reason) for g in together] == [(g.text, g.finish_reason) for g in solo]
        assert all(same_bits(a, b) for a, b in zip(together, solo))


def stream_and_leave(app, body: dict, chunks: int, before_leaving) -> list[str]:
    """Read ``chunks`` server-sent events of a streaming completion, call ``before_leaving()``, then close the connection."""
    host, port = app.state.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    texts = []
    while len(texts) < chunks:
        line = response.readline().decode()
        if line.startswith("data: {"):
            texts.append(json.loads(line[6:])["choices"][0]["text"])
    before_leaving()
    conn.sock.close()
    conn.close()
    return texts


def test_a_client_leaving_mid_batch_frees_its_row_and_changes_no_other_answer(tiny_engine, live_server):
    app = live_server(tiny_engine, ServerSettings(max_active=8))
    scheduler = app.state.scheduler
    stayers = [dict(model="tiny", prompt=f"Story {i}: the fox and the {w}", max_tokens=10 + 4 * i, temperature=0.8, seed=i) for i, w in enumerate(("dog", "cat", "owl"))]
    leaver = dict(model="tiny", prompt="A very long answer about nothing", max_tokens=200, temperature=0.8, seed=9)
    expected = [alone(tiny_engine, tiny_engine.encode_text(r["prompt"]), temperature=0.8, seed=r["seed"], max_tokens=r["max_tokens"])[0] for r in stayers]
    leaver_ids = tiny_engine.encode_text(leaver["prompt"])
    caches = []
    barrier = threading.Barrier(len(stayers) + 1)

    def stay(r):
        barrier.wait()
        return "".join(c.choices[0].text for c in client(app).completions.create(stream=True, **r))

    def find_its_cache():
        with scheduler.condition:
            caches.extend(weakref.ref(job.generation.cache) for job in scheduler.active if job.generation.prompt_ids == leaver_ids)

    def leave():
        barrier.wait()
        return stream_and_leave(app, leaver, chunks=4, before_leaving=find_its_cache)

    with ThreadPoolExecutor(len(stayers) + 1) as pool:
        left = pool.submit(leave)
        answers = list(pool.map(stay, stayers))
        left.result()
    assert answers == expected
    deadline = time.monotonic() + 60
    while (load := scheduler.load())["active"] or load["cancelled"] < 1:
        assert time.monotonic() < deadline, load
        time.sleep(0.05)
    assert load["cancelled"] == 1
    assert load["decoded_tokens"] > load["decode_steps"], "rows were decoded together"
    assert len(caches) == 1, "the leaver was still generating when it closed its stream"
    gc.collect()
    assert caches[0]() is None, "the row's cache was freed"


def test_a_short_prompt_is_answered_while_a_long_one_is_being_read(tiny_engine):
    """Events, not times: the short answer is done before the long prompt's fourth chunk, and the long one reads on after it."""
    long_ids = [5 + i % 3000 for i in range(40 * tiny_engine.chunk_size)]
    short_ids = tiny_engine.encode_text("Hello there")
    greedy = dict(temperature=0, max_tokens=3)

    async def run() -> list[tuple[str, object]]:
        loop, log = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [Job(ids, SamplingParams(**greedy), math.inf, loop, events=log, progress=ids is long_ids) for ids in (long_ids, short_ids)]
        scheduler = Scheduler(tiny_engine, PrefixCache(tiny_engine.fingerprint, "tiny", 0), max_active=4)
        for job in jobs:
            scheduler.submit(job)
        scheduler.start()
        events, finished = [], 0
        while finished < 2:
            kind, value = await asyncio.wait_for(log.get(), 300)
            if kind in ("done", "error"):
                finished += 1
                value = ("short" if value.prompt_ids == short_ids else "long", value.text)
            events.append((kind, value))
        scheduler.stop()
        return events

    events = asyncio.run(run())
    done = [i for i, (kind, _) in enumerate(events) if kind == "done"]
    short_done = next(i for i in done if events[i][1][0] == "short")
    read_before = [value for kind, value in events[:short_done] if kind == "progress"]
    read_after = [value for kind, value in events[short_done:] if kind == "progress"]
    assert read_before and max(read_before) < 4 * tiny_engine.chunk_size
    assert read_after and len(read_before) + len(read_after) == 39, "one progress event per chunk but the last"
    answers = dict(value for kind, value in events if kind == "done")
    assert answers == {
        "short": alone(tiny_engine, short_ids, **greedy)[0],
        "long": alone(tiny_engine, long_ids, **greedy)[0],
    }


def test_a_job_whose_client_left_before_it_was_admitted_counts_as_cancelled(tiny_engine):
    """A client that leaves while its job waits (a loaded server) is counted in /health's ``cancelled`` like one that
    leaves mid-answer, and the job sends nothing: the scheduler drops it and answers the next one."""

    async def run() -> tuple[dict, list]:
        loop, log = asyncio.get_running_loop(), asyncio.Queue()
        params = SamplingParams(temperature=0, max_tokens=2)
        left, staying = (Job(tiny_engine.encode_text(text), params, math.inf, loop, events=log) for text in ("Gone", "Here"))
        left.cancelled = True
        scheduler = Scheduler(tiny_engine, PrefixCache(tiny_engine.fingerprint, "tiny", 0))
        scheduler.submit(left)
        scheduler.submit(staying)
        scheduler.start()
        events = [await asyncio.wait_for(log.get(), 300)]
        while events[-1][0] not in ("done", "error"):
            events.append(await asyncio.wait_for(log.get(), 300))
        scheduler.stop()
        return scheduler.load(), events

    load, events = asyncio.run(run())
    assert load["cancelled"] == 1 and load["active"] == 0
    assert events[-1][0] == "done" and events[-1][1].prompt_ids == tiny_engine.encode_text("Here")


def test_a_row_at_the_context_limit_ends_with_length_and_the_others_go_on(tiny_engine):
    from .conftest import make_tiny

    engine = Engine(make_tiny(max_sequence_length=12), tiny_engine.tokenizer, "tiny", chunk_size=16)
    full, other = list(range(5, 15)), list(range(20, 23))  # 10 and 3 prompt tokens
    params = SamplingParams(temperature=0, max_tokens=20)
    solo_other = run_alone(engine, other, SamplingParams(temperature=0, max_tokens=5))
    rows = [engine.start(full, params), engine.start(other, SamplingParams(temperature=0, max_tokens=5))]
    for g in rows:
        g.prefill_chunk()
    while not all(g.done for g in rows):
        engine.decode([g for g in rows if not g.done])
    # the cache holds 10 prompt tokens after prefill, then one per decode step up to 12: the first token and two more
    assert rows[0].finish_reason == "length" and len(rows[0].completion_ids) == 3
    assert same_bits(rows[1], solo_other)


def test_spike_observers_see_the_real_rows_of_a_decode_step_only(tiny_engine):
    from spikingbrain.spiking.apply import observe_spikes, spikify

    from .conftest import make_tiny

    engine = Engine(spikify(make_tiny(), k=3.0), tiny_engine.tokenizer, "tiny", chunk_size=16)
    generations = [engine.start(ids, SamplingParams(temperature=0, max_tokens=4)) for ids in ([5, 6, 7], [8, 9])]
    for g in generations:
        g.prefill_chunk()
    seen = []
    with observe_spikes(engine.model, lambda name, counts, threshold: seen.append((counts.shape[0], threshold.shape[0]))):
        engine.decode(generations[:1])
        alone = set(seen)
        seen.clear()
        engine.decode(generations)
    assert alone == {(1, 1)} and set(seen) == {(2, 2)}, "8-row steps, observed without their padding rows"
