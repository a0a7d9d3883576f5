"""Spike events of a forward pass, as compact lists for neuromorphic simulators (``.npz``).

``SpikeEventRecorder`` is an observer for ``apply.observe_spikes``: for every spiking module it
encodes the counts it sees (rows = tokens of the call, flattened over the batch) as a spike
train and keeps the non-zero spikes as events ``(layer, projection, token, channel, step,
polarity)``. ``write_events`` stores them with numpy (no pickle); ``read_events`` loads them and
``SpikeEvents.counts`` decodes a stream back to its integer counts. One stream per module and
call; for MoE experts a "token" is a row of the tokens routed to that expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .apply import projection_name
from .coding import SCHEMES, decode, encode, time_steps

__all__ = ["SpikeEventRecorder", "SpikeEvents", "write_events", "read_events", "EVENT_FIELDS"]

EVENT_FIELDS = ("layer", "projection", "token", "channel", "step", "polarity")
_FORMAT = "spikingbrain-spike-events/1"


class SpikeEventRecorder:
    """Observer that records the spikes of each call as events in the chosen signed coding."""

    def __init__(self, coding: str = "bidirectional", max_tokens: int | None = None):
        if coding not in SCHEMES or coding in ("binary", "bitwise"):
            raise ValueError(f"events need a signed coding (ternary, bidirectional, twos_complement), got {coding!r}")
        self.coding, self.max_tokens = coding, max_tokens
        self.streams: list[dict] = []

    def __call__(self, name: str, counts: torch.Tensor, threshold: torch.Tensor) -> None:
        counts = counts.reshape(-1, counts.shape[-1])
        threshold = threshold.reshape(-1)
        if self.max_tokens is not None:
            counts, threshold = counts[: self.max_tokens], threshold[: self.max_tokens]
        train = encode(counts, self.coding)  # [T, tokens, channels]
        step, token, channel = (i.numpy() for i in torch.nonzero(train, as_tuple=True))
        layer, projection = projection_name(name)
        self.streams.append(
            {
                "module": name,
                "layer": -1 if layer is None else layer,
                "projection": projection,
                "steps": time_steps(counts, self.coding),
                "shape": tuple(counts.shape),
                "threshold": threshold.float().numpy(),
                "token": token,
                "channel": channel,
                "step": step,
                "polarity": train[step, token, channel].numpy(),
            }
        )


def write_events(path: str | Path, recorder: SpikeEventRecorder) -> Path:
    """Write the recorded events to ``path`` (``.npz``, compressed); returns the path."""
    if not recorder.streams:
        raise ValueError("no spikes were recorded; run the spiking model inside observe_spikes(model, recorder)")
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: spike events are written as .npz; give a file name ending in .npz")
    projections = sorted({s["projection"] for s in recorder.streams})
    index = {p: i for i, p in enumerate(projections)}
    streams = recorder.streams
    lengths = [len(s["token"]) for s in streams]
    arrays = {
        "format": np.array(_FORMAT),
        "coding": np.array(recorder.coding),
        "projections": np.array(projections),
        "stream_module": np.array([s["module"] for s in streams]),
        "stream_layer": np.array([s["layer"] for s in streams], dtype=np.int16),
        "stream_projection": np.array([index[s["projection"]] for s in streams], dtype=np.uint8),
        "stream_steps": np.array([s["steps"] for s in streams], dtype=np.uint8),
        "stream_tokens": np.array([s["shape"][0] for s in streams], dtype=np.int32),
        "stream_channels": np.array([s["shape"][1] for s in streams], dtype=np.int32),
        "stream_threshold": np.concatenate([s["threshold"] for s in streams]).astype(np.float32),
        "stream": np.repeat(np.arange(len(streams), dtype=np.int32), lengths),
        "layer": np.repeat(np.array([s["layer"] for s in streams], dtype=np.int16), lengths),
        "projection": np.repeat(np.array([index[s["projection"]] for s in streams], dtype=np.uint8), lengths),
        "token": np.concatenate([s["token"] for s in streams]).astype(np.int32),
        "channel": np.concatenate([s["channel"] for s in streams]).astype(np.int32),
        "step": np.concatenate([s["step"] for s in streams]).astype(np.uint8),
        "polarity": np.concatenate([s["polarity"] for s in streams]).astype(np.int8),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


@dataclass
class SpikeEvents:
    """Spike events read back from a file: one row per spike in the ``EVENT_FIELDS`` arrays."""

    coding: str
    projections: list[str]
    events: dict[str, np.ndarray]
    streams: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.events["token"])

    def counts(self, stream: int) -> torch.Tensor:
        """The integer counts ``[tokens, channels]`` of one stream, decoded from its events."""
        tokens, channels = int(self.streams["tokens"][stream]), int(self.streams["channels"][stream])
        steps = int(self.streams["steps"][stream])
        mine = self.events["stream"] == stream
        train = torch.zeros(steps, tokens, channels, dtype=torch.int8)
        index = [torch.from_numpy(self.events[f][mine].astype(np.int64)) for f in ("step", "token", "channel")]
        train[tuple(index)] = torch.from_numpy(self.events["polarity"][mine])
        return decode(train, self.coding)

    def threshold(self, stream: int) -> np.ndarray:
        """The threshold ``V_th`` of each token of one stream (values = counts · V_th)."""
        start = int(self.streams["tokens"][:stream].sum())
        return self.streams["threshold"][start : start + int(self.streams["tokens"][stream])]


def read_events(path: str | Path) -> SpikeEvents:
    """Load a file written by ``write_events``."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a spike-event file ({err})") from err
    with data:
        if "format" not in data.files or str(data["format"]) != _FORMAT:
            raise ValueError(f"{path}: not a spike-event file written by spikingbrain (format field missing or different)")
        events = {f: data[f] for f in (*EVENT_FIELDS, "stream")}
        streams = {k.removeprefix("stream_"): data[k] for k in data.files if k.startswith("stream_")}
        return SpikeEvents(str(data["coding"]), [str(p) for p in data["projections"]], events, streams)
