"""``spikingbrain quantize``: a W8ASpike model folder — INT8 group weights, spiking activations, or both.

Weights of the projections become symmetric INT8 per group of ``--group-size`` input channels
with clip ratios calibrated on ``--samples`` windows of the calibration text (seen through the
spiking neurons when spiking is on); ``--spiking-k`` turns spiking on in the saved config, and
``--activations int8`` makes a dense model W8A8 (its plain inputs quantized per token, multiplied
in integers on CPU). The
folder loads with ``load_model`` like any other. The command reports the file sizes (the INT8
file against the same tensors in fp32) and, with ``--eval-text``, the perplexity before and after.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..eval.perplexity import perplexity, text_token_ids
from ..model.checkpoint import copy_tokenizer_files, written_folder
from ..model.config import checked_attention_values_dtype, checked_window_kv_dtype
from ..spiking.apply import spikify
from ..spiking.int8 import quantize_model_int8

__all__ = ["calibration_batches", "w8aspike", "quantize_to_folder"]


def calibration_batches(token_ids: torch.LongTensor, samples: int, sample_tokens: int) -> list[torch.LongTensor]:
    """Up to ``samples`` consecutive windows ``[1, sample_tokens]`` from the start of ``token_ids``."""
    if samples < 1 or sample_tokens < 2:
        raise ValueError(f"calibration needs samples >= 1 and sample tokens >= 2, got {samples} and {sample_tokens}")
    windows = [token_ids[i : i + sample_tokens].view(1, -1) for i in range(0, token_ids.numel() - 1, sample_tokens)]
    if not windows:
        raise ValueError("the calibration text has no tokens; give a longer --calibration-text")
    return windows[:samples]


def _safetensors_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def w8aspike(
    model,
    calibration: list[torch.LongTensor] | None,
    group_size: int = 128,
    spiking_k: float | None = None,
    spike_query: bool = False,
    int8_kv: bool = False,
    int8_weights: bool = True,
    activations: str | None = None,
    lm_head: bool = False,
) -> dict:
    """Make ``model`` a W8ASpike (or, with ``activations="int8"``, W8A8) model in place; returns what was done and the weight bytes before and after.

    ``fp32_tensor_bytes``: the whole model in fp32 (tied tensors once); ``projection_*_bytes``: the
    quantized projections alone, fp32 against int8 codes plus fp32 scales.
    """
    tensors = {t.data_ptr(): t for t in model.state_dict().values() if t.is_floating_point()}
    fp32_bytes = sum(t.numel() * 4 for t in tensors.values())
    if spiking_k is not None:
        spikify(model, k=spiking_k, spike_query=spike_query, int8_kv=int8_kv)
    elif spike_query or int8_kv:
        raise ValueError("--spike-query and --int8-kv belong to spiking; give --spiking-k too (the report uses 3)")
    result = {"fp32_tensor_bytes": fp32_bytes}
    if activations and not int8_weights:
        raise ValueError("--activations int8 quantizes the inputs of INT8 weights; leave INT8 weights on")
    if lm_head and not int8_weights:
        raise ValueError("--lm-head makes the output head INT8 beside the projections; leave INT8 weights on")
    if int8_weights:
        clips = quantize_model_int8(model, group_size, calibration=calibration, activations=activations, lm_head=lm_head)
        layers = [model.get_submodule(name) for name in clips]
        result["projection_fp32_bytes"] = sum(layer.weight.numel() * 4 for layer in layers)
        result["projection_int8_bytes"] = sum(layer.weight.numel() + layer.weight_scale.numel() * 4 for layer in layers)
        result["projection_size_ratio"] = result["projection_fp32_bytes"] / result["projection_int8_bytes"]
    elif spiking_k is None:
        raise ValueError("nothing to do: give --spiking-k, or leave INT8 weights on")
    return {**result, "spiking": model.config.spiking, "weight_quantization": model.config.weight_quantization}


def quantize_to_folder(
    model_ref: str,
    out: str | Path,
    calibration_text: str | None = None,
    eval_text: str | None = None,
    group_size: int = 128,
    samples: int = 128,
    sample_tokens: int = 256,
    spiking_k: float | None = None,
    spike_query: bool = False,
    int8_kv: bool = False,
    int8_weights: bool = True,
    context: int = 2048,
    activations: str | None = None,
    max_tokens: int | None = None,
    lm_head: bool = False,
    window_kv_dtype: str | None = "auto",
    attention_values_dtype: str = "float32",
) -> dict:
    """Load ``model_ref``, make it W8ASpike (:func:`w8aspike`, calibrated on ``calibration_text``) and save it in ``out``.

    With ``eval_text`` the result has the perplexity before and after (first ``max_tokens`` tokens,
    windows of ``context``); it always has the file bytes against the fp32 tensor bytes.
    ``window_kv_dtype`` (``"float16"`` or ``"int8"``) is saved in the config: the folder's sliding-window layers keep
    the keys and values of decode steps in that dtype (see ``SpikingBrainConfig``); None keeps the model's dtype;
    ``"auto"`` is ``"int8"`` with ``int8_kv`` (those layers attend int8 keys and values anyway, and an int8 ring holds
    exactly their codes and scales: a quarter of the bytes) and None otherwise. ``attention_values_dtype="bfloat16"``
    (saved in the config; needs ``spike_query`` and ``int8_kv``) makes the integer attention kernel sum its weighted
    values in bf16 where the CPU has AVX-512 BF16: faster, no longer the simulation's numbers.
    """
    if checked_attention_values_dtype(attention_values_dtype) == "bfloat16" and not (spike_query and int8_kv):
        raise ValueError("attention_values_dtype='bfloat16' is for the integer attention of spiked queries over int8 keys "
                         "and values: add spike_query and int8_kv (--spike-query --int8-kv)")
    if window_kv_dtype == "auto":
        window_kv_dtype = "int8" if int8_kv else None
    from ..model.loading import load_model, load_tokenizer
    from ..model.loading import resolve_folder

    start = time.perf_counter()
    tokenizer = load_tokenizer(model_ref)
    model = load_model(model_ref)
    eval_ids = text_token_ids(tokenizer, eval_text, max_tokens) if eval_text else None
    result = {"model": str(model_ref), "out": str(out)}
    if eval_ids is not None:
        result["ppl_before"] = perplexity(model, eval_ids, context, progress=True)["ppl"]
    calibration = None
    if calibration_text is not None and int8_weights:
        calibration = calibration_batches(text_token_ids(tokenizer, calibration_text), samples, sample_tokens)
        result["calibration"] = {"windows": len(calibration), "tokens": sum(c.numel() for c in calibration)}
    print("quantizing" + (f" with {len(calibration)} calibration windows" if calibration else ""), file=sys.stderr)
    result.update(w8aspike(model, calibration, group_size, spiking_k, spike_query, int8_kv, int8_weights, activations, lm_head))
    if window_kv_dtype is not None:
        model.config.window_kv_dtype = result["window_kv_dtype"] = checked_window_kv_dtype(window_kv_dtype)
    model.config.attention_values_dtype = result["attention_values_dtype"] = attention_values_dtype
    if eval_ids is not None:
        result["ppl_after"] = perplexity(model, eval_ids, context, progress=True)["ppl"]
        result["ppl_ratio"] = result["ppl_after"] / result["ppl_before"]
    with written_folder(out) as staging:
        model.save_pretrained(staging)
        copy_tokenizer_files(resolve_folder(model_ref), staging)
    result["file_bytes"] = _safetensors_bytes(Path(out))
    result["size_ratio_fp32_over_file"] = result["fp32_tensor_bytes"] / result["file_bytes"]
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result
