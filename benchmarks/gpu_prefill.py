"""Time to first token on a GPU: a SpikingBrain-7B-shaped random model against a Transformer of the same shapes with
full softmax attention in every layer (transformers' Qwen2, SDPA), side by side, with the prefill's model FLOP
utilisation (MFU).

Usage: python benchmarks/gpu_prefill.py [--lengths 128k,512k,1m] [--baseline-lengths 128k,512k] [--out DIR]

Both models are random (the time of a prefill does not depend on the weights' values), bf16, built on the
device: ours from ``spikingbrain_7b()`` (GLA on even layers, 4096-token SWA on odd ones), streaming its prefill
in chunks of ``--chunk`` tokens; the baseline Qwen2.5-7B's shapes (``transformers.Qwen2ForCausalLM``, SDPA),
one call over the whole prompt. Each prefill is ``model(ids, use_cache=True, logits_to_keep=1)`` under
``torch.inference_mode()``, timed between CUDA synchronisations after one untimed warm-up at the first length.
MFU is the counted matmul FLOPs of the prefill (``spikingbrain.bench.flops.prefill_flops``; the same formula
with full attention for the baseline) over seconds over ``--peak-tflops``. Lengths stop once ``--max-seconds``
of timing have passed, so the run fits a short lease (the baseline's cost grows as the square of the length), and
after a length that ran out of memory.
``--tiny`` shrinks every width and the layer count (a smoke run on CPU). Writes gpu_prefill.json and
gpu_prefill.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from spikingbrain import SpikingBrainForCausalLM
from spikingbrain.bench.flops import prefill_flops
from spikingbrain.model.presets import spikingbrain_7b
from spikingbrain.runtime.lengths import format_length, parse_lengths
from spikingbrain.runtime.machine import machine_info
from spikingbrain.runtime.plots import COLORS, new_figure, save_loglog
from spikingbrain.runtime.records import command_line, write_json

#: Dense bf16 tensor-core peak of an H100 / H200 SXM (NVIDIA's data sheet, without sparsity), in TFLOP/s.
H200_BF16_TFLOPS = 989.4
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, sliding_window=64)


def configs(layers: int | None, chunk: int, tiny: bool):
    """Our SpikingBrain-7B config and the baseline's: the same shapes with full attention in every layer."""
    fields = dict(TINY) if tiny else {}
    if layers:
        fields["num_hidden_layers"] = layers
    ours = spikingbrain_7b(**fields, streaming_chunk_size=chunk)
    full = spikingbrain_7b(**fields, layer_mixers=["full"] * ours.num_hidden_layers)
    return ours, full


def baseline_model(config, device: torch.device, dtype: torch.dtype):
    """transformers' Qwen2 (SDPA) with ``config``'s shapes, random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=1 << 21, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    with torch.device(device):
        return Qwen2ForCausalLM(qwen).to(dtype).eval()


def time_prefill(model, length: int, vocab: int, device: torch.device) -> float:
    """Seconds of one prefill of ``length`` random tokens."""
    ids = torch.randint(0, vocab, (1, length), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, use_cache=True, logits_to_keep=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(name: str, model, config, lengths: list[int], device, peak_tflops: float, deadline: float) -> dict:
    """Seconds, tokens/s and MFU per length until ``deadline`` (perf_counter) passes; printed as they come."""
    rows, stop = {}, None
    for length in lengths:
        stop = stop or ("out of time" if time.perf_counter() > deadline else None)
        if stop:
            print(f"{name} {format_length(length)}: skipped ({stop})", flush=True)
            rows[length] = {"skipped": stop}
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds = time_prefill(model, length, config.vocab_size, device)
        except torch.OutOfMemoryError as error:  # the longer lengths are skipped too: they need more
            print(f"{name} {format_length(length)}: out of memory ({error})", flush=True)
            rows[length], stop = {"skipped": "out of memory"}, "a shorter length ran out of memory"
            continue
        flops = prefill_flops(config, length)["total"]
        row = {"seconds": seconds, "tokens_per_s": length / seconds, "tflops": flops / seconds / 1e12,
               "mfu": flops / seconds / 1e12 / peak_tflops}
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows[length] = row
        print(f"{name} {format_length(length)}: {seconds:.2f} s, {row['tokens_per_s']:.0f} tok/s, MFU {row['mfu']:.1%}", flush=True)
    return rows


def plot(result: dict, path: Path) -> Path:
    """TTFT of both models against prompt length, log-log."""
    fig, (ax,) = new_figure(1, (6, 4))
    for (name, rows), color in zip(result["prefill"].items(), (COLORS["ours"], COLORS["baseline"])):
        timed = [(int(n), r["seconds"]) for n, r in rows.items() if "seconds" in r]
        if timed:
            ax.plot(*zip(*timed), marker="o", color=color, label=name)
    ax.set_ylabel("time to first token (s)")
    return save_loglog(fig, [ax], path, "prompt tokens", f"{result['device']}, {result['dtype']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128k,512k,1m", help="prompt lengths of our model")
    parser.add_argument("--baseline-lengths", default="128k,512k", help="prompt lengths of the full-attention baseline")
    parser.add_argument("--layers", type=int, default=None, help="layer count (default: the 7B's 28)")
    parser.add_argument("--chunk", type=int, default=65536, help="tokens per step of our streaming prefill")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="the device's bf16 peak for MFU")
    parser.add_argument("--max-seconds", type=float, default=360.0, help="stop starting prefills after this long")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small widths and 4 layers: a smoke run, on CPU too")
    parser.add_argument("--out", default="runs/gpu-prefill")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no GPU; give --device cpu (with --tiny) for a smoke run")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths, baseline_lengths = parse_lengths(args.lengths), parse_lengths(args.baseline_lengths)
    ours_config, full_config = configs(args.layers, args.chunk, args.tiny)
    started = time.perf_counter()
    deadline = started + args.max_seconds
    with torch.device(device):
        ours = SpikingBrainForCausalLM(ours_config).to(dtype).eval()
    time_prefill(ours, min(lengths), ours_config.vocab_size, device)  # warm-up: kernels, allocator
    prefill = {"spikingbrain_7b_shaped": measure("ours", ours, ours_config, lengths, device, args.peak_tflops, deadline)}
    del ours
    baseline = baseline_model(full_config, device, dtype)
    time_prefill(baseline, min(baseline_lengths), full_config.vocab_size, device)
    prefill["full_attention_sdpa"] = measure("baseline", baseline, full_config, baseline_lengths, device, args.peak_tflops,
                                             deadline)
    speedup = {format_length(n): prefill["full_attention_sdpa"][n]["seconds"] / prefill["spikingbrain_7b_shaped"][n]["seconds"]
               for n in baseline_lengths if "seconds" in prefill["full_attention_sdpa"].get(n, {})
               and "seconds" in prefill["spikingbrain_7b_shaped"].get(n, {})}
    result = {
        "command": command_line(), "machine": machine_info(), "settings": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "torch": torch.__version__,
        "prefill": {name: {str(n): row for n, row in rows.items()} for name, rows in prefill.items()},
        "ttft_speedup": speedup, "wall_seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    write_json(out / "gpu_prefill.json", result)
    plot(result, out / "gpu_prefill.png")
    print("TTFT speedup over full attention:", {n: f"{s:.1f}x" for n, s in speedup.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
