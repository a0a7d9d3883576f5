"""W8ASpike weights: symmetric INT8 per group of input channels, with clipping calibrated on sample inputs.

A weight row is cut into groups of ``group_size`` input channels (the last group may be
shorter); each group has one scale ``s = clip · max|w| / 127`` and stores ``round(w / s)`` in
[-127, 127]. ``Int8Linear`` keeps the codes (int8) and scales (fp32) and multiplies with the
dequantised weight; with spiking inputs the product equals ``V_th · Σ_g s_g (W_g · counts_g)``,
integer arithmetic inside each group. Calibration picks, per row and group, the clip ratio that
minimises the output error ``e H eᵀ`` where ``H = XᵀX`` is the Gram matrix of the layer's
inputs on calibration text (the inputs as the layer sees them: spiked when spiking is on).
The settings live in ``config.weight_quantization`` so a saved INT8 model reloads as INT8.
``group_size`` 0 means one scale per output channel (the whole row is one group).

The integer path: when its spiking neuron hands an ``Int8Linear`` its raw input (``SpikingInput``)
on a device with int8 matmuls (``ops.int8``; CPU) and no gradient is wanted, the layer computes
``y = V_th · Σ_g s_g (counts_g @ codes_gᵀ) + b`` with int8 counts, int8 codes and int32
accumulation (``torch._int_mm``, one product per group). Counts are clipped to ±127 in that
product; the few columns (input channels) whose counts go beyond, the massive-activation channels
of a trained model, add what the clipping missed through an fp32 product of those columns alone,
so the result equals the fp32 simulation up to fp32 rounding. Counting (division, rounding, int8
cast, finding those columns) and the dequantisation (scales, threshold, bias) are each one
``torch.compile`` (inductor) kernel where compiling works, eager otherwise (``fused_passes``); the
threshold is the simulation's own, eager. Projections that read the same input tensor (q/k/v and the GLA gate;
gate/up) count it once: the last counts are kept, per thread, while that tensor lives and is
unchanged (``_counts_of``); in decode steps they also share one integer product
(``link_sibling_products``, ``ProductGroup``). By default (``integer_matmul`` None) the path runs only for
layers with one weight group per row, where it measured faster than the simulation; elsewhere,
and where int8 matmuls are missing or a gradient is wanted, the layer runs the simulation: the
spiked input times the dequantised weight.

W8 (a plain input, no spiking): up to ``DECODE_MAX_ROWS`` rows (decode steps) on CPU are multiplied by
one compiled reduction over the codes and scales (``_weight_only_product``, where the groups divide the row),
which never writes a dequantised weight; more rows, or a gradient, multiply the dequantised weight.

W8A8 (``activations: "int8"`` in the settings, for dense models): a plain input is quantized per
token, ``x ≈ s_x · round_half_up(x / s_x)`` with ``s_x = max|x| / 127``, and multiplied by the same
integer path with ``s_x`` in the threshold's place (the codes never pass ±127, so nothing is clipped); the
simulation, where int8 matmuls are missing or a gradient is wanted, is that rounded input times
the dequantised weight.

Decode rows (up to ``VNNI_MAX_ROWS``) of layers with one scale per output channel go through our AVX-512 VNNI kernel
(``ops.int8``, ``ops/kernels/int8_rows.c``) where the CPU has it and a C compiler built it: one call quantizes the
rows (W8A8's per-token scale found in the kernel, or the spiking threshold given), multiplies in int32 and
dequantises, equal to the ``torch._int_mm`` path bit for bit. Rows with a count beyond ±127 take the two-plane
product above. Prefill rows of such layers keep the counting pass above and then go through the same kernel's
product of counts (``vnni_codes_product``), which multiplies and dequantises in one pass (no int32 products in
memory), equal to ``torch._int_mm`` and the fused dequantisation bit for bit. ``row_kernel(False)`` turns both off.

The output head (``lm_head: true`` in the settings): ``Int8Head``, W8A8 with one scale per output channel, untied
from the embeddings (which stay fp32). Its decode rows take the VNNI kernel, or oneDNN's int8 linear one row at a
time where the kernel does not run (for the 576 -> 49152 head oneDNN measured 1.06 ms against fp32's 5.0 ms);
more rows take the integer path above.
"""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.int8 import (
    VNNI_MAX_ROWS, VnniInt8Weight, int8_matmul_available, onednn_int8_linear_available, onednn_int8_row_product, onednn_pack_int8_weight,
    vnni_checked_rows_product, vnni_codes_product, vnni_pack_int8_weight, vnni_rows_available,
)
from ..ops.integer_attention import require_bf16_values
from .apply import DEFAULT_TARGETS, current_spiking, spikify, spiking_linears
from .neuron import THRESHOLD_RANGE, SpikingInput, adaptive_threshold, check_firing_k, round_half_up, spike_quantize

__all__ = [
    "CLIP_GRID",
    "Int8Linear",
    "Int8Head",
    "quantize_groups",
    "dequantize_groups",
    "clip_ratios",
    "weight_quantization_settings",
    "prepare_int8_layers",
    "quantize_model_int8",
    "fake_quantize_int8",
    "set_integer_matmul",
    "link_sibling_products",
    "ProductGroup",
    "fused_passes",
    "Fused",
    "row_kernel",
    "ACTIVATION_MODES",
    "per_token_int8_scale",
    "quantize_activations_int8",
]

#: ``weight_quantization.activations``: None (float or spiking inputs, W8 / W8ASpike) or ``"int8"`` (W8A8).
ACTIVATION_MODES = (None, "int8")

#: Clip ratios tried by calibration (1.0 = no clipping, the round-to-nearest default).
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, G, group_size]`` view of the rows, the last group zero-padded."""
    out, inp = weight.shape
    count = -(-inp // group_size)
    padded = F.pad(weight, (0, count * group_size - inp))
    return padded.view(out, count, group_size)


def _symmetric_scale(amax: torch.Tensor) -> torch.Tensor:
    """INT8 scale ``amax / 127`` of a symmetric range (1 where ``amax`` is 0, so zeros stay zeros)."""
    return torch.where(amax > 0, amax / 127, torch.ones_like(amax))


def quantize_groups(weight: torch.Tensor, group_size: int = 128, clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [out, in], scales fp32 [out, groups])`` of a 2-D weight (``group_size`` 0: per output channel);
    ``clip`` ``[out, groups]`` scales the range."""
    if weight.dim() != 2:
        raise ValueError(f"INT8 weight quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    if group_size < 0:
        raise ValueError(f"group_size must be >= 1 (or 0: per output channel), got {group_size}")
    group_size = group_size or weight.shape[1]
    groups = _groups(weight.detach().float(), group_size)
    amax = groups.abs().amax(-1)
    if clip is not None:
        amax = amax * clip
    scales = _symmetric_scale(amax)
    codes = torch.round(groups / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.view(weight.shape[0], -1)[:, : weight.shape[1]].contiguous(), scales


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 weight ``codes · scale`` of each group."""
    return codes.float() * scales.repeat_interleave(group_size, dim=1)[:, : codes.shape[1]]


def clip_ratios(weight: torch.Tensor, gram: torch.Tensor, group_size: int = 128, grid: Iterable[float] = CLIP_GRID) -> torch.Tensor:
    """Per row and group, the clip ratio in ``grid`` with the least output error ``e H_gg eᵀ`` (``gram`` = ``XᵀX``)."""
    weight = weight.detach().float()
    inp = weight.shape[1]
    group_size = group_size or inp
    if gram.shape != (inp, inp):
        raise ValueError(f"Gram matrix has shape {tuple(gram.shape)}, expected ({inp}, {inp}) for this weight")
    groups = _groups(weight, group_size)
    count = groups.shape[1]
    padded = F.pad(gram.float(), (0, count * group_size - inp, 0, count * group_size - inp))
    blocks = torch.stack([padded[g * group_size : (g + 1) * group_size, g * group_size : (g + 1) * group_size] for g in range(count)])
    best_error, best_clip = None, None
    for ratio in grid:
        clip = torch.full(groups.shape[:2], float(ratio))
        codes, scales = quantize_groups(weight, group_size, clip)
        error = _groups(dequantize_groups(codes, scales, group_size) - weight, group_size)
        cost = torch.einsum("ogi,gij,ogj->og", error, blocks, error)
        if best_error is None:
            best_error, best_clip = cost, clip
        else:
            better = cost < best_error
            best_error, best_clip = torch.where(better, cost, best_error), torch.where(better, clip, best_clip)
    return best_clip


class Fused:
    """``fn`` compiled by inductor on first use; eager where compiling fails (say, no C++ compiler) or is off."""

    compile = True

    def __init__(self, fn: Callable):
        self.fn, self.compiled = fn, None

    def __call__(self, *args):
        if not Fused.compile:
            return self.fn(*args)
        if self.compiled is None:
            try:
                compiled = torch.compile(self.fn, dynamic=True)
                result = compiled(*args)
            except Exception as error:  # any compiler failure: the eager function computes the same
                warnings.warn(f"torch.compile failed ({type(error).__name__}); the integer path runs eager", stacklevel=2)
                self.compiled = self.fn
                return self.fn(*args)
            self.compiled = compiled
            return result
        return self.compiled(*args)


class _RowKernel:
    """Whether decode rows may take the VNNI kernel (``row_kernel``)."""

    enabled = True


def row_kernel(enabled: bool) -> None:
    """Let per-channel layers multiply through our VNNI kernels where they run (True, the default): decode rows from
    the input, prefill rows from their counts; or always through the ``torch._int_mm`` product (False)."""
    _RowKernel.enabled = bool(enabled)


def fused_passes(enabled: bool) -> None:
    """Compile (True, the default) or run eager (False) the counting and dequantising passes of the integer path."""
    Fused.compile = bool(enabled)


def per_token_int8_scale(x: torch.Tensor) -> torch.Tensor:
    """``max|x| / 127`` over the last dimension (1 where a row is all zero), that dimension kept."""
    return _symmetric_scale(x.detach().abs().amax(-1, keepdim=True))


def quantize_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """W8A8's per-token input rounding, ``s_x · round_half_up(x / s_x)``, as the integer path computes it."""
    scale = per_token_int8_scale(x)
    return round_half_up(x / scale) * scale


def _low_plane(x: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spike counts of ``x`` ``[M, K]`` clipped to ±127 as int8, and which columns have counts beyond ±127."""
    counts = round_half_up(x / threshold)
    return counts.clamp(-127, 127).to(torch.int8), counts.abs().amax(0) > 127


def _dequantize(products: torch.Tensor, threshold: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``V_th · Σ_g s_g · products_g (+ bias)`` from integer ``products`` ``[G, M, N]`` and ``scales`` ``[G, 1, N]``,
    in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.promote_types(threshold.dtype, torch.float32)
    y = (products.to(dtype) * scales).sum(0) * threshold.to(dtype)
    return y if bias is None else y + bias.to(dtype)


def _weight_only_product(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] @ (codes · scale)ᵀ`` as one reduction over the codes (groups of equal size), never a dequantised weight."""
    groups = scales.shape[1]
    products = (x.view(x.shape[0], 1, groups, -1) * codes.view(1, codes.shape[0], groups, -1).to(x.dtype)).sum(-1)
    y = (products * scales).sum(-1)
    return y if bias is None else y + bias


_fused_low_plane, _fused_dequantize = Fused(_low_plane), Fused(_dequantize)
_fused_weight_only = Fused(_weight_only_product)

#: Rows up to which a product is a decode step's, bound by reading the weight and by the cost of each call: a plain
#: input (W8) is multiplied by the fused kernel ``_weight_only_product``, which reads the codes once per call, and the
#: integer path counts and dequantises in eager PyTorch (a compiled region costs more per call than these few rows).
DECODE_MAX_ROWS = 8


class _Counts(NamedTuple):
    """An input's integer form: ``x ≈ threshold · low``, plus ``excess`` on the ``columns`` beyond ±127."""

    threshold: torch.Tensor  # [M, 1]
    low: torch.Tensor  # [M, K] int8: the counts clipped to ±127
    columns: torch.Tensor  # the input channels whose counts go beyond ±127 (usually none or a few)
    excess: torch.Tensor | None  # [M, len(columns)]: threshold · (counts - low) on those columns


def _count(flat: torch.Tensor, threshold: torch.Tensor) -> _Counts:
    """The counts of rows ``flat`` at ``threshold`` ``[M, 1]``, with the excess of the columns beyond ±127. The threshold
    is computed eager (``threshold_of(flat, *args)``): a compiled reduction sums in another order, and a threshold one ulp
    off moves counts across rounding boundaries, away from the simulation's."""
    low, beyond = (_low_plane if flat.shape[0] <= DECODE_MAX_ROWS else _fused_low_plane)(flat, threshold)
    columns = beyond.nonzero().squeeze(1)
    excess = (round_half_up(flat[:, columns] / threshold) - low[:, columns].to(flat.dtype)) * threshold if columns.numel() else None
    return _Counts(threshold, low, columns, excess)


class _LastCounts(threading.local):
    """The counts last computed in this thread, and of which input tensor."""

    source: weakref.ref | None = None
    key: tuple | None = None
    counts: _Counts | None = None

    def forget(self, _dead=None) -> None:
        self.source = self.key = self.counts = None


_last_counts = _LastCounts()


def _input_key(x: torch.Tensor, threshold_of: Callable[..., torch.Tensor], args: tuple) -> tuple:
    """What makes two calls on the tensor ``x`` the same input: the threshold, its shape, storage and version counter
    (inference tensors have none)."""
    version = None if torch.is_inference(x) else x._version
    return threshold_of, args, version, x.shape, x.stride(), x.data_ptr()


def _counts_of(x: torch.Tensor, threshold_of: Callable[..., torch.Tensor], *args) -> _Counts:
    """``x``'s counts at the threshold ``threshold_of(x as rows, *args)``, reused when the same tensor, unchanged, comes again (sibling
    projections): the tensor object is the key, and its version counter where it has one (inference tensors have none)."""
    key = _input_key(x, threshold_of, args)
    memo = _last_counts
    if memo.source is not None and memo.source() is x and memo.key == key:
        return memo.counts
    memo.forget()
    flat = x.reshape(-1, x.shape[-1])
    counts = _count(flat, threshold_of(flat, *args))
    memo.source, memo.key, memo.counts = weakref.ref(x, memo.forget), key, counts
    return counts


def _buffer_versions(*tensors: torch.Tensor) -> tuple:
    """Storage and version counter of each tensor: changes when one is replaced or written in place (cache keys).
    Inference tensors have no version counter: their storage is the key."""
    return tuple([(t.data_ptr(), None if t.is_inference() else t._version) for t in tensors])


class ProductGroup:
    """``Int8Linear`` layers with the same input columns, multiplied in integers as one product: their codes side by
    side, one ``torch._int_mm`` per weight group and one dequantisation for all. Sibling projections that read one
    input (``link_sibling_products``) get their decode-row outputs from one call; a layer alone is a group of one."""

    def __init__(self, members: list["Int8Linear"]):
        self.members = members
        self._layout: tuple | None = None  # (buffer versions, [(columns, codes [K_g, ΣN])], scales [G, 1, ΣN], bias)
        self._outliers: tuple | None = None  # ((buffer versions, dtype), columns, weight [ΣN, len(columns)])
        self._pending: tuple | None = None  # (counts, the product, members yet to take theirs)
        self._vnni: tuple | None = None  # (buffer versions, the members' weights as one VnniInt8Weight)
        self._vnni_pending: tuple | None = None  # (input ref, input key, the product or None if clipped, members yet)
        starts = itertools.accumulate((m.out_features for m in members), initial=0)
        self._columns = {m: (start, m.out_features) for m, start in zip(members, starts)}  # each member's output columns

    def output(self, member: "Int8Linear", counts: _Counts) -> torch.Tensor:
        """``member``'s product ``[M, N]`` of these counts; for decode rows the first member to ask computes every
        member's (fewer, larger calls), for more rows each member its own (its output contiguous: measured faster)."""
        if len(self.members) > 1 and counts.low.shape[0] > DECODE_MAX_ROWS:
            return member.product_alone.output(member, counts)
        pending = self._pending
        if pending is None or pending[0] is not counts or member not in pending[2]:
            pending = self._pending = counts, self._product(counts), set(self.members)
        pending[2].discard(member)
        if not pending[2]:
            self._pending = None
        return self._columns_of(member, pending[1])

    def vnni_output(self, member: "Int8Linear", flat: torch.Tensor, source: torch.Tensor,
                    threshold_of: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """``member``'s product of decode rows ``flat`` (``source`` reshaped) by the VNNI kernel, which the first member
        to ask computes for every member in one call (the per-call cost dominates these rows). The same input tensor,
        unchanged, is the same call."""
        if len(self.members) == 1:  # nothing to share
            return self._vnni_product(flat, threshold_of, args)
        key = _input_key(source, threshold_of, args)
        pending = self._vnni_pending
        if pending is None or pending[0]() is not source or pending[1] != key or member not in pending[3]:
            pending = self._vnni_pending = weakref.ref(source), key, self._vnni_product(flat, threshold_of, args), set(self.members)
        pending[3].discard(member)
        if not pending[3]:
            self._vnni_pending = None
        return self._columns_of(member, pending[2])

    def _columns_of(self, member: "Int8Linear", product: torch.Tensor) -> torch.Tensor:
        """``member``'s columns of the members' product side by side (a view)."""
        start, width = self._columns[member]
        return product.narrow(1, start, width)

    def _vnni_product(self, flat: torch.Tensor, threshold_of: Callable[..., torch.Tensor], args: tuple) -> torch.Tensor:
        """Every member's product of ``flat`` side by side: the kernel's product of the counts clipped to ±127, plus, where
        counts pass ±127 (massive-activation channels), what the clipping left out, in fp32 as the two-plane product adds it."""
        flat, spike_threshold = flat.contiguous(), None
        if threshold_of is per_token_int8_scale:
            scales = None  # found in the kernel
        elif threshold_of is adaptive_threshold:  # the kernel divides mean|x| by k and clamps, as adaptive_threshold does
            scales, spike_threshold = flat.abs().mean(-1), (check_firing_k(*args), *THRESHOLD_RANGE)
        else:
            scales = threshold_of(flat, *args).reshape(-1).contiguous()
        y, _, beyond = vnni_checked_rows_product(flat, scales, self._vnni_weight(), spike_threshold)
        if beyond is not None:  # only spike counts clip (W8A8's per-token scale maps the largest input to 127)
            y.addmm_(beyond.excess, self._outlier_weight(beyond.columns, y.dtype).t())
        return y

    def _vnni_weight(self) -> VnniInt8Weight:
        """The members' codes, scales and biases side by side as one VNNI weight, rebuilt when a buffer changes."""
        key = self._versions()
        if self._vnni is None or self._vnni[0] != key:
            members = self.members
            bias = None
            if any(m.bias is not None for m in members):
                bias = torch.cat([m.bias if m.bias is not None else m.weight_scale.new_zeros(m.out_features) for m in members])
            weight = vnni_pack_int8_weight(torch.cat([m.weight for m in members]), torch.cat([m.weight_scale for m in members]), bias)
            self._vnni = key, weight
        return self._vnni[1]

    def _versions(self) -> tuple:
        """Changes when a member's codes, scales or bias do: what the cached layouts are rebuilt on."""
        return _buffer_versions(*(t for m in self.members for t in m.own_tensors()))

    def _integer_layout(self) -> tuple:
        """Per weight group its input columns and the members' codes ``[K_g, ΣN]`` (contiguous), the scales
        ``[G, 1, ΣN]`` and the biases (zeros for members without one; None if none has one); rebuilt when a buffer changes."""
        key = self._versions()
        if self._layout is None or self._layout[0] != key:
            first = self.members[0]
            columns = [slice(start, start + first.group_size) for start in range(0, first.in_features, first.group_size)]
            groups = [(cols, torch.cat([m.weight[:, cols].t() for m in self.members], dim=1).contiguous()) for cols in columns]
            scales = torch.cat([m.weight_scale.t().unsqueeze(1) for m in self.members], dim=2).contiguous()
            biases = None
            if any(m.bias is not None for m in self.members):
                biases = torch.cat([m.bias.detach() if m.bias is not None else m.weight_scale.new_zeros(m.out_features)
                                    for m in self.members])
            self._layout = key, groups, scales, biases
        return self._layout[1:]

    def _product(self, counts: _Counts) -> torch.Tensor:
        rows = counts.low.shape[0]
        if rows > DECODE_MAX_ROWS and self._vnni_prefill(counts):  # the product and its scaling in one kernel pass
            y = vnni_codes_product(counts.low, counts.threshold, self._vnni_weight())
        else:
            groups, scales, bias = self._integer_layout()
            products = torch.empty(len(groups), rows, scales.shape[-1], dtype=torch.int32, device=counts.low.device)
            for g, (cols, codes_t) in enumerate(groups):
                torch._int_mm(counts.low[:, cols], codes_t, out=products[g])
            y = (_dequantize if rows <= DECODE_MAX_ROWS else _fused_dequantize)(products, counts.threshold, scales, bias)
        if counts.columns.numel():  # counts beyond ±127 (massive-activation channels): what the clipped plane missed, in fp32
            y.addmm_(counts.excess.to(y.dtype), self._outlier_weight(counts.columns, y.dtype).t())
        return y

    def _vnni_prefill(self, counts: _Counts) -> bool:
        """Whether these counts' product goes through the VNNI kernel: fp32 thresholds on CPU, a layout it takes."""
        return counts.threshold.dtype == torch.float32 and counts.low.device.type == "cpu" and self.members[0]._vnni_layout()

    def _outlier_weight(self, columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The members' dequantised weights of input ``columns`` ``[ΣN, len(columns)]``, kept while the same columns come again."""
        key = self._versions(), dtype
        cached = self._outliers
        if cached is None or cached[0] != key or not torch.equal(cached[1], columns):
            weight = torch.cat([m.weight[:, columns].to(dtype) * m.weight_scale[:, columns // m.group_size] for m in self.members])
            self._outliers = cached = key, columns, weight
        return cached[2]


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored as INT8 codes with one fp32 scale per group of input channels
    (``group_size`` 0: per output channel); with spiking input it multiplies in integers (module docstring)."""

    #: a spiking neuron hands this layer its raw input (``SpikingInput``) instead of the spiked one
    takes_spiking_input = True

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 128, activations: str | None = None):
        super().__init__()
        if activations not in ACTIVATION_MODES:
            raise ValueError(f"Int8Linear activations must be one of {ACTIVATION_MODES}, got {activations!r}")
        self.int8_activations = activations == "int8"
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size or in_features
        groups = -(-in_features // self.group_size)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        #: None: the integer path where it measured faster than the simulation on CPU (one weight group per row,
        #: ``group_size`` 0); True: for every group size; False: never (the simulation)
        self.integer_matmul: bool | None = None
        #: this layer's own integer product, and the one it shares with its siblings (``link_sibling_products``) for
        #: decode rows; alone by default
        self.product_alone = self.product_group = ProductGroup([self])
        self._packed_weights: dict[str, tuple] = {}  # kernel name -> (buffer versions, the weight in its layout)
        #: the neuron ``spiking.spikify`` gives this layer's input (it calls it here, not as a module hook), or None
        self.spike_input = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, clip: torch.Tensor | None = None,
                    activations: str | None = None) -> "Int8Linear":
        """Quantize a dense linear layer (optionally with calibrated clip ratios; ``activations="int8"``: W8A8)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, activations)
        codes, scales = quantize_groups(linear.weight, layer.group_size, clip)
        layer.weight.copy_(codes)
        layer.weight_scale.copy_(scales)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        return layer.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as fp32."""
        return dequantize_groups(self.weight, self.weight_scale, self.group_size)

    def _integer(self, x: torch.Tensor) -> bool:
        """Whether this call takes the integer path."""
        wanted = self.group_size >= self.in_features if self.integer_matmul is None else self.integer_matmul
        return wanted and not torch.is_grad_enabled() and int8_matmul_available(x.device)

    def forward(self, x: torch.Tensor | SpikingInput) -> torch.Tensor:
        neuron = self.spike_input
        if neuron is not None and not isinstance(x, SpikingInput):
            if neuron.observer is None and self._integer(x):  # what neuron.apply would hand over, without the detour
                return self._integer_forward(x, adaptive_threshold, neuron.k)
            x = neuron.apply(self, x)
        if isinstance(x, SpikingInput):
            if self._integer(x.x):
                return self._integer_forward(x.x, adaptive_threshold, x.k)
            x = spike_quantize(x.x, x.k)
        elif self.int8_activations:
            if self._integer(x):
                return self._integer_forward(x, per_token_int8_scale)
            x = quantize_activations_int8(x)
        elif self._fused_weight_only(x):
            flat = x.reshape(-1, self.in_features)
            y = _fused_weight_only(flat, self.weight, self.weight_scale, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def _fused_weight_only(self, x: torch.Tensor) -> bool:
        """Whether a plain input takes the fused weight-only product: a few fp32 rows on CPU, no gradient, groups of equal size."""
        rows = x.numel() // self.in_features
        return (self.integer_matmul is not False and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and rows <= DECODE_MAX_ROWS and self.in_features % self.group_size == 0)

    def _integer_forward(self, x: torch.Tensor, threshold_of: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """``x``'s product through integer counts ``round_half_up(x / t)``, ``t = threshold_of(rows, *args)`` ``[M, 1]``:
        decode rows by the VNNI kernel where it runs, otherwise ``torch._int_mm``."""
        flat = x.reshape(-1, self.in_features)
        if self._vnni_rows(flat):
            return self.product_group.vnni_output(self, flat, x, threshold_of, *args).view(*x.shape[:-1], self.out_features)
        y = self.product_group.output(self, _counts_of(x, threshold_of, *args))
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _vnni_rows(self, flat: torch.Tensor) -> bool:
        """Whether rows ``flat`` go through the VNNI kernel from the input: a few fp32 rows, a layout it takes."""
        return flat.shape[0] <= VNNI_MAX_ROWS and flat.dtype == torch.float32 and self._vnni_layout()

    def _vnni_layout(self) -> bool:
        """Whether this layer's products may take the VNNI kernel: it is on (``row_kernel``) and runs here, one scale per
        output channel, input features in multiples of 4."""
        return _RowKernel.enabled and self.group_size >= self.in_features and self.in_features % 4 == 0 and vnni_rows_available()

    def own_tensors(self) -> tuple[torch.Tensor, ...]:
        """The codes, the scales and (where there is one) the bias: what packed layouts are built from. Read from the
        module's dictionaries, not through ``__getattr__``: a decode step asks for them on every product."""
        bias = self._parameters.get("bias")
        weight, scale = self._buffers["weight"], self._buffers["weight_scale"]
        return (weight, scale) if bias is None else (weight, scale, bias)

    def _packed(self, kernel: str, layout: Callable[["Int8Linear"], object]):
        """This layer's weight in ``kernel``'s layout, ``layout(self)``, kept until its codes, scales or bias change."""
        key = _buffer_versions(*self.own_tensors())
        cached = self._packed_weights.get(kernel)
        if cached is None or cached[0] != key:
            cached = self._packed_weights[kernel] = key, layout(self)
        return cached[1]

    def extra_repr(self) -> str:
        activations = ", int8 activations per token" if self.int8_activations else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 groups of {self.group_size}{activations}")


class Int8Head(Int8Linear):
    """The output head as W8A8 (per-channel codes, per-token int8 inputs, no bias); on the integer path its decode rows
    go through the VNNI kernel, else oneDNN's int8 linear (module docstring), more rows through ``Int8Linear``'s product."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 0, activations: str | None = "int8"):
        if bias or group_size not in (0, in_features) or activations != "int8":
            raise ValueError("an INT8 output head is W8A8 with one scale per output channel and no bias; "
                             f"got bias={bias}, group_size={group_size}, activations={activations!r}")
        super().__init__(in_features, out_features, bias=False, group_size=0, activations="int8")

    def _integer_forward(self, x: torch.Tensor, threshold_of: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self._vnni_rows(flat) or flat.shape[0] > DECODE_MAX_ROWS or not onednn_int8_linear_available():
            return super()._integer_forward(x, threshold_of, *args)
        counts = _counts_of(x, threshold_of, *args)  # per-token codes never pass ±127: no excess columns
        weight = self._packed("onednn", _onednn_layout)
        y = torch.cat([onednn_int8_row_product(counts.low[i : i + 1], float(counts.threshold[i]), weight) for i in range(flat.shape[0])])
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def _onednn_layout(layer: Int8Linear):
    return onednn_pack_int8_weight(layer.weight, layer.weight_scale)


def set_integer_matmul(model: nn.Module, enabled: bool | None) -> int:
    """Choose the integer path (and W8's fused decode product) of every ``Int8Linear`` in ``model``: None (the default)
    where it is faster (per-channel weights; with groups of 128 the simulation ran faster on this project's CPU), True
    for every layer, False for none (the fp32 simulation: the dequantised weight); returns how many. W8ASpike
    attention layers (those with an ``attention_in_integers`` switch) follow: False computes their attention in fp32 too."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    for layer in layers:
        layer.integer_matmul = None if enabled is None else bool(enabled)
    for module in model.modules():
        if hasattr(module, "attention_in_integers"):
            module.attention_in_integers = enabled is not False
    return len(layers)


def set_bf16_attention_values(model: nn.Module, enabled: bool) -> int:
    """Let the integer attention kernel of every W8ASpike attention layer in ``model`` sum its weighted values in bf16
    (``enabled``) or in fp32, the simulation's numbers (the default); returns how many layers. bf16 halves that part's
    instructions and rounds each weight by up to 2^-9 of itself; it needs AVX-512 BF16."""
    if enabled:
        require_bf16_values()
    layers = [m for m in model.modules() if hasattr(m, "bf16_attention_values")]
    for layer in layers:
        layer.bf16_attention_values = bool(enabled)
    return len(layers)


#: Names of sibling projections that read one input: a mixer's q/k/v and GLA gate (full-rank, or the first of the
#: low-rank pair), an MLP's gate and up.
SIBLING_PROJECTIONS = (("q_proj", "k_proj", "v_proj", "gk_proj", "gk_proj.0"), ("gate_proj", "up_proj"))


def link_sibling_products(model: nn.Module) -> int:
    """Give the ``Int8Linear`` siblings of each module (``SIBLING_PROJECTIONS``) with the same input width and
    weight layout one ``ProductGroup``, so that their integer products run as one; returns how many groups."""
    linked = 0
    for parent in model.modules():
        for names in SIBLING_PROJECTIONS:
            layers = [parent.get_submodule(n) for n in names if _has_submodule(parent, n)]
            layers = [m for m in layers if isinstance(m, Int8Linear)]
            layout = {(m.in_features, m.group_size, m.int8_activations) for m in layers}
            if len(layers) > 1 and len(layout) == 1:
                group = ProductGroup(layers)
                for layer in layers:
                    layer.product_group = group
                linked += 1
    return linked


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def weight_quantization_settings(group_size: int = 128, targets: Iterable[str] = DEFAULT_TARGETS, dense: Iterable[str] = (),
                                 activations: str | None = None, lm_head: bool = False) -> dict:
    """The validated ``config.weight_quantization`` dictionary; ``dense`` names target modules that keep a dense weight;
    ``activations="int8"``: W8A8 (plain inputs quantized per token); ``lm_head``: the output head as ``Int8Head``."""
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"weight_quantization activations must be one of {ACTIVATION_MODES} (int8: W8A8), got {activations!r}")
    if int(group_size) != group_size or group_size < 0:
        raise ValueError(
            f"weight_quantization group_size must be a positive integer (W8ASpike uses 128) or 0 (per output channel), got {group_size}"
        )
    targets = list(targets)
    if not targets:
        raise ValueError(f"weight_quantization targets must name projections like {list(DEFAULT_TARGETS)}")
    dense = sorted(dense)
    return {"bits": 8, "group_size": int(group_size), "targets": targets, **({"dense": dense} if dense else {}),
            **({"activations": activations} if activations else {}), **({"lm_head": True} if lm_head else {})}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def prepare_int8_layers(model: nn.Module, settings: dict) -> None:
    """Swap the target linear layers for empty ``Int8Linear`` ones, so INT8 weights can be loaded into them."""
    dense = set(settings.get("dense", ()))
    for name, linear in spiking_linears(model, settings["targets"]).items():
        if isinstance(linear, nn.Linear) and name not in dense:
            _replace(model, name, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, settings["group_size"],
                                             settings.get("activations")))
    if settings.get("lm_head"):
        head = model.get_submodule("lm_head")
        _replace(model, "lm_head", Int8Head(head.in_features, head.out_features))
    link_sibling_products(model)


def quantize_model_int8(
    model: nn.Module,
    group_size: int = 128,
    targets: Iterable[str] = DEFAULT_TARGETS,
    calibration: Iterable[torch.Tensor] | None = None,
    grid: Iterable[float] = CLIP_GRID,
    activations: str | None = None,
    lm_head: bool = False,
) -> dict:
    """Quantize the target projections of ``model`` to INT8 in place; returns ``{name: clip ratios}``.

    ``calibration`` yields input-id batches; the model is run on them to collect each layer's
    input Gram matrix, and the clip ratios are chosen to minimise the output error. Without it,
    plain round-to-nearest (clip 1.0). ``lm_head``: the output head too, as ``Int8Head`` (untied from the embeddings).
    """
    settings = weight_quantization_settings(group_size, targets, activations=activations, lm_head=lm_head)
    linears = {n: m for n, m in spiking_linears(model, settings["targets"]).items() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(f"no dense projection of this model matches {settings['targets']} (already INT8?)")
    grams: dict[str, torch.Tensor] = {}
    if calibration is not None:
        grams = _input_grams(model, linears, calibration)
    clips = {}
    for name, linear in linears.items():
        clip = clip_ratios(linear.weight, grams[name], group_size, grid) if name in grams else None
        _replace(model, name, Int8Linear.from_linear(linear, group_size, clip, activations))
        clips[name] = clip
    if lm_head:
        _quantize_head(model)
    link_sibling_products(model)
    spiking = current_spiking(model)
    if spiking:  # the spiking hooks sat on the replaced layers
        spikify(model, **spiking)
    if hasattr(model, "config"):
        model.config.weight_quantization = settings
    return clips


def _quantize_head(model: nn.Module) -> None:
    """Replace ``model.lm_head`` by its ``Int8Head``, untying it from the embeddings (which keep their fp32 weight)."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"lm_head: this model has no dense output head to quantize (found {type(head).__name__})")
    config = getattr(model, "config", None)
    if config is not None and config.tie_word_embeddings:
        config.tie_word_embeddings = False
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)
    _replace(model, "lm_head", Int8Head.from_linear(head, 0, activations="int8"))


def _input_grams(model: nn.Module, linears: dict[str, nn.Linear], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``XᵀX`` of each layer's input over the calibration batches (fp64)."""
    grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}
    last: list = [None, None]  # the previous input and its XᵀX: q/k/v (and gate/up) read the same input

    def collect(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if last[0] is None or last[0].shape != x.shape or not torch.equal(last[0], x):
                last[:] = x, (x.T @ x).double()
            grams[name] += last[1]

        return hook

    # registered after any spiking hooks, so they see the inputs the layer really gets
    handles = [m.register_forward_pre_hook(collect(n)) for n, m in linears.items()]
    seen = 0
    try:
        with torch.inference_mode():
            for ids in batches:
                model(ids, use_cache=False)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ValueError("calibration gave no batches; give at least one sample of text")
    return grams


def fake_quantize_int8(x: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 round trip over the last dimension (one scale per vector): W8ASpike's K/V quantization."""
    scale = per_token_int8_scale(x)
    return torch.round(x / scale).clamp(-127, 127) * scale
