"""The VNNI kernel for decode rows (``ops/kernels/int8_rows.c``) against products summed in int64, and its build.

Reference: codes ``floor(x / s + 1/2)`` (the division in fp32, as the kernel divides) clipped to ±127, times the
weight codes in int64, then the same fp32 scaling in the same order: the kernel must match it bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from spikingbrain.ops import native
from spikingbrain.ops.int8 import VNNI_MAX_ROWS, vnni_int8_rows_product, vnni_pack_int8_weight, vnni_rows_available


def _cpu_has_vnni() -> bool:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    return {"avx512f", "avx512bw", "avx512_vnni"} <= flags


def test_the_kernel_is_available_wherever_the_cpu_and_a_compiler_allow_it():
    # a failed build on a capable machine must fail here, not quietly fall back
    assert vnni_rows_available() == (_cpu_has_vnni() and shutil.which("cc") is not None)


needs_vnni = pytest.mark.skipif(not _cpu_has_vnni(), reason="this CPU has no AVX-512 VNNI")


def _reference(x, s, codes, scales, bias):
    q = torch.floor((x / s[:, None]).double() + 0.5)
    clipped = int((q.abs() > 127).sum())
    acc = q.clamp(-127, 127).long() @ codes.long().t()
    y = (acc.float() * scales) * s[:, None]
    return (y if bias is None else y + bias), clipped


@needs_vnni
@pytest.mark.parametrize("n_out,n_in", [(1, 4), (15, 8), (16, 576), (17, 12), (65, 256), (1000, 576)])
@pytest.mark.parametrize("rows", [1, 2, 5, VNNI_MAX_ROWS])
@pytest.mark.parametrize("bias", [True, False])
def test_rows_equal_the_int64_product_bit_for_bit(n_out, n_in, rows, bias):
    gen = torch.Generator().manual_seed(n_out * 31 + rows)
    codes = torch.randint(-127, 128, (n_out, n_in), dtype=torch.int8, generator=gen)
    scales = torch.rand(n_out, generator=gen) * 0.01 + 1e-4
    b = torch.randn(n_out, generator=gen) if bias else None
    x = torch.randn(rows, n_in, generator=gen) * 3
    s = x.abs().amax(-1) / 127
    x[:, 0] = (torch.randint(-100, 100, (rows,), generator=gen) + 0.5) * s  # exact ties: rounded half up
    x[0, -1] = 400 * s[0]  # one code beyond ±127, clipped
    y, clipped = vnni_int8_rows_product(x, s, vnni_pack_int8_weight(codes, scales, b))
    expected, expected_clipped = _reference(x, s, codes, scales, b)
    assert clipped == expected_clipped >= 1
    assert torch.equal(y, expected)


@needs_vnni
def test_threads_split_the_outputs_without_changing_them():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (4099, 64), dtype=torch.int8, generator=gen)
    weight = vnni_pack_int8_weight(codes, torch.rand(4099, generator=gen))
    x = torch.randn(3, 64, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = vnni_int8_rows_product(x[:1], x[:1].abs().amax(-1) / 127, weight)[0]
        torch.set_num_threads(2)
        two = vnni_int8_rows_product(x[:1], x[:1].abs().amax(-1) / 127, weight)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_vnni
def test_bad_shapes_name_what_the_kernel_takes():
    with pytest.raises(ValueError, match="multiples of 4, got 6"):
        vnni_pack_int8_weight(torch.zeros(3, 6, dtype=torch.int8), torch.ones(3))
    weight = vnni_pack_int8_weight(torch.zeros(3, 8, dtype=torch.int8), torch.ones(3))
    with pytest.raises(ValueError, match=r"1-8 fp32 CPU rows of 8 features"):
        vnni_int8_rows_product(torch.zeros(9, 8), torch.ones(9), weight)
    with pytest.raises(ValueError, match="float64"):
        vnni_int8_rows_product(torch.zeros(1, 8, dtype=torch.float64), torch.ones(1), weight)


def test_a_kernel_is_built_once_into_the_cache_and_reused(tmp_path, monkeypatch):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("SPIKINGBRAIN_CACHE", str(tmp_path))
    lib = native.load_kernel.__wrapped__("int8_rows")
    built = sorted((tmp_path / "kernels").iterdir())  # the kernel and the worker pool it links against
    assert lib is not None and [p.name.split("-")[0] for p in built] == ["int8_rows", "thread_pool"]
    assert all(p.suffix == ".so" for p in built)
    stamps = [p.stat().st_mtime_ns for p in built]
    assert native.load_kernel.__wrapped__("int8_rows") is not None
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "kernels").iterdir())] == stamps  # no rebuild, no leftovers


def test_a_failing_compiler_warns_and_leaves_nothing_behind(tmp_path, monkeypatch):
    fake = tmp_path / "broken-cc"
    fake.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("SPIKINGBRAIN_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="building the int8_rows kernel .* failed .*cannot compile"):
        assert native.load_kernel.__wrapped__("int8_rows") is None
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []


def test_no_compiler_warns_and_returns_none(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="no C compiler"):
        assert native.load_kernel.__wrapped__("int8_rows") is None


@needs_vnni
@pytest.mark.parametrize("rows", [1, 4])
def test_per_token_scales_found_in_the_kernel_equal_w8a8s(rows):
    from spikingbrain.spiking.int8 import per_token_int8_scale

    gen = torch.Generator().manual_seed(rows)
    codes = torch.randint(-127, 128, (40, 64), dtype=torch.int8, generator=gen)
    weight = vnni_pack_int8_weight(codes, torch.rand(40, generator=gen), torch.randn(40, generator=gen))
    x = torch.randn(rows, 64, generator=gen) * 5
    x[-1] = 0.0  # a row of zeros: scale 1, product = bias
    found, clipped = vnni_int8_rows_product(x, None, weight)
    given, _ = vnni_int8_rows_product(x, per_token_int8_scale(x), weight)
    assert clipped == 0 and torch.equal(found, given)
    assert torch.equal(found[-1], weight.bias)


@needs_vnni
@pytest.mark.parametrize("rows", [1, 3])
def test_spike_thresholds_and_clipped_columns_found_in_the_kernel(rows):
    """Given mean|x| and ``k``, the kernel's thresholds are ``adaptive_threshold``'s (clamped rows too): the product
    equals the one with torch's thresholds given, bit for bit. The clipped columns and their excess are what the
    counts beyond ±127 leave out: computed here from ``round_half_up`` in torch."""
    from spikingbrain.ops.int8 import vnni_checked_rows_product
    from spikingbrain.spiking.neuron import THRESHOLD_RANGE, adaptive_threshold, round_half_up

    gen = torch.Generator().manual_seed(rows)
    codes = torch.randint(-127, 128, (40, 64), dtype=torch.int8, generator=gen)
    weight = vnni_pack_int8_weight(codes, torch.rand(40, generator=gen), torch.randn(40, generator=gen))
    x = torch.randn(rows, 64, generator=gen) * torch.logspace(-2, 2, rows)[:, None]
    x[:, 5] = 3e3  # counts in the thousands: clipped in every row
    x[-1, 9] = -700.0  # and a second column in one row
    if rows > 1:
        x[0] = 1e-8  # a threshold clamped at its lower end
        x[1, :] = 5e6  # and at its upper end
    threshold = adaptive_threshold(x, 3.0)
    assert rows == 1 or (threshold[0] == THRESHOLD_RANGE[0] and threshold[1] == THRESHOLD_RANGE[1])
    found = vnni_checked_rows_product(x, x.abs().mean(-1), weight, (3.0, *THRESHOLD_RANGE))
    given = vnni_checked_rows_product(x, threshold.reshape(-1).contiguous(), weight)
    assert torch.equal(found[0], given[0]) and found[1] == given[1] > 0
    q = round_half_up(x / threshold)
    columns = (q.abs() > 127).any(0).nonzero().squeeze(1)
    assert torch.equal(found[2].columns, columns)
    assert torch.equal(found[2].excess, (q[:, columns] - q[:, columns].clamp(-127, 127)) * threshold)
