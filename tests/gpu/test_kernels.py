"""Every CUDA kernel against the CPU reference (issue 5 item 5; GPU.md 4.2).

Reference: the dequantized weight W = (code - bias) * scale from rtnq.numerics.rtn.dequantize on the codes and
scales before packing (rtnq.numerics.marlin.pack), and out_ref = x.double() @ W.double().T. Inputs are random
(never zeros: uniformly random codes hit every code value), outputs are pre-filled with NaN so an
unwritten element fails, every case runs three times and must be bit-identical, and after every GEMM
the workspace counters must be back to zero (the split-K protocol resets them).

Bounds (relative Frobenius error): fp16 1e-3, bf16 8e-3 (fp32 accumulation; the 16-bit output rounding
dominates). The dequantize kernel must be bit-exact.

Shapes off the kernels' tiles (n % 64, k % 128) are stored padded (MarlinWeight.pack -> marlin.pad); ops runs them
at the stored dims and returns logical results, which are checked against the same logical reference (PADDED).

The reference runs on the CPU. For the two largest shapes (8192x28672, 4096x128256) the same reference
code (rtn.dequantize) is evaluated on the GPU to fit the time budget; test_reference_cpu_equals_gpu
shows on a realistic shape that torch computes it bit-identically on both devices.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from rtnq.numerics import marlin, rtn, shape_rule
from rtnq.runtime import MarlinWeight, QuantLinear, library, load_checkpoint, ops

M_LIST = [1, 2, 3, 7, 16, 17, 33, 64, 65, 255, 1024, 1500]
PATHS = ["small_m", "tensor_core", "dequant"]
TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float16, torch.bfloat16]
# (k, n) = (in_features, out_features): Llama-3.1-8B o/q, gate|up, down, 70B gate|up, 8B lm_head
REALISTIC = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (4096, 128256)]
CPU_REF_MAX = 4096 * 14336  # above this many weights the reference code runs on the GPU
# (n, k, group) stored padded: both dims (a 576-wide model, g64 since 576 % 128 != 0), k only, n only,
# k below one tile (96 -> 128, g32), channelwise with k % 128 != 0, and wide n padded (3 tiles of 64 + tail).
PADDED = [(576, 576, 64), (192, 576, 64), (100, 256, 128), (64, 96, 32), (72, 200, -1), (200, 1024, 128)]


def dev() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@functools.lru_cache(maxsize=4)
def packed_codes(bits: int, n: int, k: int, seed: int = 0):
    """Random codes (n, k) uint8 and their Marlin qweight, on the CPU."""
    gen = torch.Generator().manual_seed(seed * 7919 + bits * 131 + n + k)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
    groups = max(1, k // 128)
    qweight, _ = marlin.pack(codes, torch.ones(n, groups, dtype=torch.float16), bits)
    return codes, qweight


def random_scales(bits: int, n: int, k: int, group: int, dtype, seed: int = 0):
    """Scales (n, groups) in a range that keeps |out| comfortably inside fp16 for these k."""
    gen = torch.Generator().manual_seed(seed + 17 * bits + group)
    groups = 1 if group == -1 else k // group
    lo, hi = (5e-3, 2e-2) if bits == 4 else (3e-4, 1.2e-3)
    return (lo + (hi - lo) * torch.rand(n, groups, generator=gen)).to(dtype)


class Case:
    """One weight: the packed MarlinWeight on the GPU plus the reference W (n, k), both logical."""

    def __init__(self, bits, n, k, group, dtype, ref_on_gpu=False, seed=0):
        self.bits, self.n, self.k, self.group, self.dtype = bits, n, k, group, dtype
        scales = random_scales(bits, n, k, group, dtype, seed)
        if shape_rule.padded(n, k) != (n, k):  # stored padded: pack through MarlinWeight.pack (marlin.pad)
            gen = torch.Generator().manual_seed(seed * 7919 + bits * 131 + n + k)
            codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
            self.weight = MarlinWeight.pack(codes, scales, bits, group).to(dev())
            assert self.weight.is_padded and (self.weight.n, self.weight.k) == (n, k)
            self.w_ref = rtn.dequantize(codes, scales, bits, group).to(dev())
            return
        codes, qweight = packed_codes(bits, n, k, seed)
        self.weight = MarlinWeight(qweight.to(dev()), marlin.permute_scales(scales.t().contiguous()).to(dev()),
                                   bits=bits, n=n, k=k, group_size=group)
        if ref_on_gpu:
            self.w_ref = rtn.dequantize(codes.to(dev()), scales.to(dev()), bits, group)
        else:
            self.w_ref = rtn.dequantize(codes, scales, bits, group).to(dev())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def assert_workspace_clean():
    torch.cuda.synchronize()
    for ws in ops._workspaces.values():
        counters = ws[: 16 * 1024].view(torch.int32)
        assert int(counters.abs().sum()) == 0, "split-K counters were not reset"


def run_gemm(case: Case, x: torch.Tensor, path: str) -> torch.Tensor:
    out = torch.full((x.shape[0], case.n), float("nan"), dtype=x.dtype, device=x.device)
    res = ops.gemm(x, case.weight, path=path, out=out)
    assert res.data_ptr() == out.data_ptr()
    return out


@functools.lru_cache(maxsize=1)
def host_reference_lib() -> ctypes.CDLL:
    """The test-only build/librtnq_emu.so, which holds the kernels' host references (cuda/emu/host_ref.h)."""
    default = Path(__file__).resolve().parents[2] / "cuda" / "build" / "librtnq_emu.so"
    path = Path(os.environ.get("RTNQ_CUDA_EMU_LIB", default))
    if not path.is_file():
        pytest.skip(f"{path} not built (make -C cuda)")
    lib = ctypes.CDLL(str(path))
    P, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.rtnq_host_gemm_small_m.argtypes = [P, P, P, P, i64, i64, i64, i32, i32, i32, i32]
    lib.rtnq_host_last_error.restype = ctypes.c_char_p
    return lib


def check_gemm(case: Case, m_list=M_LIST, paths=PATHS, seed=0):
    gen = torch.Generator(device=dev()).manual_seed(seed)
    x_full = torch.randn(max(m_list), case.k, generator=gen, device=dev()).to(case.dtype)
    ref_full = x_full.double() @ case.w_ref.double().t()
    failures = []
    for m in m_list:
        x, ref = x_full[:m], ref_full[:m]
        for path in paths:
            runs = [run_gemm(case, x, path) for _ in range(3)]
            torch.cuda.synchronize()
            tag = f"{path} m={m} w{case.bits} {case.dtype} g{case.group} k={case.k} n={case.n}"
            if not torch.isfinite(runs[0]).all():
                failures.append(f"{tag}: {int((~torch.isfinite(runs[0])).sum())} non-finite (unwritten?) outputs")
                continue
            err = rel_err(runs[0], ref)
            if err >= TOL[case.dtype]:
                failures.append(f"{tag}: relative error {err:.2e} >= {TOL[case.dtype]:.0e}")
            if not all(torch.equal(runs[0], r) for r in runs[1:]):
                failures.append(f"{tag}: results differ between runs")
        assert_workspace_clean()
    assert not failures, "\n".join(failures)


# ---- Dequantize: bit-exact -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [128, 64, 32, -1])
@pytest.mark.parametrize("k,n", [(128, 64), (384, 192), (512, 320), (1024, 4096)])
def test_dequantize_bit_exact_small(bits, dtype, group, k, n):
    case = Case(bits, n, k, group, dtype)
    for layout in ("nk", "kn"):
        out = torch.full((n, k) if layout == "nk" else (k, n), float("nan"), dtype=dtype, device=dev())
        ops.dequantize(case.weight, layout=layout, out=out)
        got = out if layout == "nk" else out.t()
        assert torch.equal(got.view(torch.int16), case.w_ref.view(torch.int16)), layout


def test_reference_cpu_equals_gpu():
    codes, _ = packed_codes(4, 14336, 4096)
    for dtype in DTYPES:
        scales = random_scales(4, 14336, 4096, 128, dtype)
        cpu = rtn.dequantize(codes, scales, 4, 128)
        gpu = rtn.dequantize(codes.to(dev()), scales.to(dev()), 4, 128).cpu()
        assert torch.equal(cpu.view(torch.int16), gpu.view(torch.int16))


# ---- GEMM: every path, every M ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [128, 64, 32, -1])
@pytest.mark.parametrize("k,n", [(128, 64), (384, 192), (512, 320), (2048, 1024)])
def test_gemm_small_shapes(bits, dtype, group, k, n):
    check_gemm(Case(bits, n, k, group, dtype), seed=k + n)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,n", REALISTIC)
def test_realistic_shapes(bits, k, n):
    # One test per packed weight (packing 500M codes on the CPU takes seconds): for fp16 and bf16, grouped and
    # channelwise, the dequantize kernel bit-exact in both layouts, then every GEMM path at every M.
    for dtype in DTYPES:
        for group in (128, -1):
            case = Case(bits, n, k, group, dtype, ref_on_gpu=n * k > CPU_REF_MAX)
            for layout in ("nk", "kn"):
                got = ops.dequantize(case.weight, layout=layout)
                got = got if layout == "nk" else got.t()
                assert torch.equal(got.view(torch.int16), case.w_ref.view(torch.int16)), (dtype, group, layout)
                del got
            check_gemm(case, seed=bits)
            del case
            torch.cuda.empty_cache()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [128, -1])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16, 40])
def test_small_m_is_bit_identical_to_host_emulation(bits, dtype, group, m):
    # The host emulator repeats the kernel's fp32 operation order exactly, given the kernel's split count.
    ref = host_reference_lib()
    k, n = 2048, 512
    case = Case(bits, n, k, group, dtype)
    x = torch.randn(m, k, device=dev()).to(dtype)
    out = run_gemm(case, x, "small_m")
    splits, rows = ops.plan("small_m", m, n, k, bits=bits, group_size=group, dtype=dtype)
    assert splits >= 1 and rows in (1, 2, 4, 8)
    xc, qc, sc = x.cpu(), case.weight.qweight.cpu(), case.weight.scales.cpu()
    host = torch.full((m, n), float("nan"), dtype=dtype)
    status = ref.rtnq_host_gemm_small_m(xc.data_ptr(), qc.data_ptr(), sc.data_ptr(), host.data_ptr(), m, n, k, bits,
                                        group, library.BFLOAT16 if dtype == torch.bfloat16 else library.FLOAT16, splits)
    assert status == 0, ref.rtnq_host_last_error().decode()
    assert torch.equal(out.cpu().view(torch.int16), host.view(torch.int16)), f"splits={splits}"


def test_paths_agree_with_each_other():
    case = Case(4, 4096, 4096, 128, torch.bfloat16)
    x = torch.randn(48, 4096, device=dev()).to(torch.bfloat16)
    outs = {p: run_gemm(case, x, p).double() for p in PATHS}
    for p in ("small_m", "tensor_core"):
        assert rel_err(outs[p], outs["dequant"]) < 8e-3, p


def test_plan_reports_split_k_for_a_small_grid():
    info = library.device_info()
    splits, rows = ops.plan("tensor_core", 16, 4096, 4096, bits=4, group_size=128, dtype=torch.bfloat16)
    assert rows == 16 and 1 <= splits <= 4096 // 128
    assert splits > 1 or info["sm_count"] <= 32  # 32 column tiles cannot fill a big GPU without split-K
    splits, rows = ops.plan("tensor_core", 1024, 4096, 4096, bits=4, group_size=128, dtype=torch.bfloat16)
    assert rows == 64 and splits == 1


# ---- Padded shapes: logical (n, k) off the tiles, run at the stored dims -------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group", PADDED)
def test_dequantize_bit_exact_padded(bits, dtype, n, k, group):
    case = Case(bits, n, k, group, dtype)
    for layout in ("nk", "kn"):
        out = torch.full((n, k) if layout == "nk" else (k, n), float("nan"), dtype=dtype, device=dev())
        assert ops.dequantize(case.weight, layout=layout, out=out).data_ptr() == out.data_ptr()
        got = out if layout == "nk" else out.t()
        assert torch.equal(got.view(torch.int16), case.w_ref.view(torch.int16)), layout
        fresh = ops.dequantize(case.weight, layout=layout)
        assert tuple(fresh.shape) == tuple(out.shape) and torch.equal(fresh, out), layout
    # Bit-identical to the CPU reference path of the same weight (unpack at stored dims, crop, rtn.dequantize).
    assert torch.equal(ops.dequantize(case.weight).cpu(), case.weight.to("cpu").reference_dequantize())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group", PADDED)
def test_gemm_padded_shapes(bits, dtype, n, k, group):
    check_gemm(Case(bits, n, k, group, dtype), seed=k + n)


def test_padded_gemm_ignores_what_lies_beyond_x():
    # x a view whose row stride runs into NaN columns: ops must zero-pad a copy, never read past k
    # (NaN * the padding's 0.0 would poison every output). Also out=None and out= agree.
    case = Case(4, 100, 200, -1, torch.bfloat16)
    for m in (1, 7, 40, 300):
        big = torch.full((m, 256), float("nan"), dtype=torch.bfloat16, device=dev())
        big[:, :200] = torch.randn(m, 200, device=dev()).to(torch.bfloat16)
        x = big[:, :200]
        ref = x.double() @ case.w_ref.double().t()
        for path in ("auto",) + tuple(PATHS):
            y = ops.gemm(x, case.weight, path=path)
            assert y.shape == (m, 100) and y.is_contiguous() and bool(torch.isfinite(y).all()), (m, path)
            assert rel_err(y, ref) < 8e-3, (m, path)
            out = torch.full((m, 100), float("nan"), dtype=torch.bfloat16, device=dev())
            assert ops.gemm(x, case.weight, path=path, out=out).data_ptr() == out.data_ptr()
            assert torch.equal(out, y), (m, path)
    assert_workspace_clean()


def test_padded_gemm_in_a_cuda_graph():
    # The padded path allocates temporaries (zero-padded x, the (m, n_stored) result); it must still capture.
    case = Case(4, 576, 576, 64, torch.bfloat16)
    x = torch.randn(24, 576, device=dev()).to(torch.bfloat16)
    capture = torch.cuda.Stream()
    for p in ("small_m", "tensor_core"):
        expected = run_gemm(case, x, p)
        capture.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(capture):
            ops.gemm(x, case.weight, path=p)
        capture.synchronize()
        out = torch.empty(24, 576, dtype=torch.bfloat16, device=dev())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture):
            ops.gemm(x, case.weight, path=p, out=out)
        for _ in range(2):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, expected), p
    assert_workspace_clean()


@pytest.mark.parametrize("n,k,group", [(576, 576, 64), (100, 200, -1)])
def test_quantlinear_cuda_matches_cpu_path_padded(n, k, group):
    w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16)
    cpu = QuantLinear.from_weight(w, 4, group, bias=bias)
    gpu = QuantLinear.from_weight(w, 4, group, bias=bias).to(dev())
    assert gpu.packed.is_padded and (gpu.out_features, gpu.in_features) == (n, k)
    assert torch.equal(gpu.dequantized_weight().cpu(), cpu.dequantized_weight())
    for m in (1, 5, 40, 2000):
        x = torch.randn(m, k).to(torch.bfloat16)
        ref = x.double() @ cpu.dequantized_weight().double().t() + bias.double()
        y = gpu(x.to(dev())).cpu()
        assert y.shape == (m, n) and rel_err(y, ref) < 8e-3, m


# ---- Integration --------------------------------------------------------------------------------------------------


def test_device_info_is_sane():
    info = library.device_info()
    props = torch.cuda.get_device_properties(info["device"])
    assert info["name"] == props.name
    assert info["sm_count"] == props.multi_processor_count
    assert info["major"] >= 8 and info["driver_version"] >= 12000 and info["runtime_version"] >= 12000
    assert library.device_count() == torch.cuda.device_count()


def test_non_contiguous_and_offset_inputs():
    case = Case(4, 256, 512, 128, torch.float16)
    big = torch.randn(9, 2 * 512, device=dev()).to(torch.float16)
    x = big[:, ::2]  # non-contiguous
    ref = x.double() @ case.w_ref.double().t()
    for path in PATHS:
        assert rel_err(ops.gemm(x, case.weight, path=path), ref) < 1e-3
    flat = torch.randn(1 + 5 * 512, device=dev()).to(torch.float16)
    x = flat[1:].view(5, 512)  # 2-byte offset: not 16-byte aligned, ops copies it
    ref = x.double() @ case.w_ref.double().t()
    for path in PATHS:
        assert rel_err(ops.gemm(x, case.weight, path=path), ref) < 1e-3


def test_side_stream_and_cuda_graph():
    case = Case(8, 1024, 2048, 128, torch.bfloat16)
    x = torch.randn(24, 2048, device=dev()).to(torch.bfloat16)
    expected = {p: run_gemm(case, x, p) for p in ("small_m", "tensor_core")}
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        side = {p: run_gemm(case, x, p) for p in expected}
    stream.synchronize()
    for p in expected:
        assert torch.equal(side[p], expected[p]), p
    capture = torch.cuda.Stream()
    for p in expected:
        capture.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(capture):  # warm-up outside capture: the stream's workspace, smem attributes
            ops.gemm(x, case.weight, path=p)
        capture.synchronize()
        out = torch.empty(24, 1024, dtype=torch.bfloat16, device=dev())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture):
            ops.gemm(x, case.weight, path=p, out=out)
        for _ in range(3):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, expected[p]), p
    assert_workspace_clean()


@pytest.mark.parametrize("bits,group", [(4, 128), (8, -1)])
def test_quantlinear_cuda_matches_cpu_path(bits, group):
    w = (torch.randn(512, 1024) * 0.02).to(torch.bfloat16)
    bias = torch.randn(512).to(torch.bfloat16)
    cpu = QuantLinear.from_weight(w, bits, group, bias=bias)
    gpu = QuantLinear.from_weight(w, bits, group, bias=bias).to(dev())
    assert torch.equal(gpu.dequantized_weight().cpu(), cpu.dequantized_weight())
    for m in (1, 5, 40, 2000):
        x = torch.randn(m, 1024).to(torch.bfloat16)
        ref = x.double() @ cpu.dequantized_weight().double().t() + bias.double()
        y = gpu(x.to(dev())).cpu()
        assert rel_err(y, ref) < 8e-3, m
        assert rel_err(cpu(x), ref) < 8e-3


def test_loader_on_cuda(tmp_path):
    # The converted directory of tests/test_runtime.py, loaded onto the GPU: same results as on the CPU.
    spec = importlib.util.spec_from_file_location("rtnq_test_runtime", Path(__file__).parent.parent / "test_runtime.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    helpers.write_checkpoint(tmp_path / "ckpt")
    on_gpu = load_checkpoint(tmp_path / "ckpt", device="cuda")
    on_cpu = load_checkpoint(tmp_path / "ckpt", device="cpu")
    assert set(on_gpu.linears) == set(on_cpu.linears)
    for name, layer in on_gpu.linears.items():
        assert layer.qweight.is_cuda
        x = torch.randn(3, layer.in_features).to(torch.bfloat16)
        ref = on_cpu.linears[name](x).double()
        assert rel_err(layer(x.to(dev())).cpu(), ref) < 8e-3, name
    assert all(t.is_cuda for t in on_gpu.tensors.values())


def test_exports_load_on_cuda_like_the_marlin_format(tmp_path):
    # GPTQ and compressed-tensors exports are repacked into Marlin on load: on the GPU they must give the
    # marlin format's outputs exactly (same bytes, same kernels).
    from rtnq.commands import convert
    from rtnq import synthetic

    src = tmp_path / "src"
    synthetic.write_checkpoint(src, synthetic.SampleSpec(hidden=256, intermediate=512, layers=1))
    loaded = {}
    for fmt in ("marlin", "gptq", "compressed-tensors"):
        opts = convert.Options(keep_int8=["mlp"], format=fmt)
        convert.run(convert.make_plan(src, tmp_path / fmt, opts))
        loaded[fmt] = load_checkpoint(tmp_path / fmt, device="cuda")
    for name, layer in loaded["marlin"].linears.items():
        x = torch.randn(5, layer.in_features, device=dev()).to(torch.bfloat16)
        want = layer(x)
        for fmt in ("gptq", "compressed-tensors"):
            assert torch.equal(loaded[fmt].linears[name](x), want), (fmt, name)


def test_huge_m_stays_correct_on_small_m_path():
    # The small-M path accepts any m (one CTA row per 8 rows of x); check one m far beyond its sweet spot.
    case = Case(4, 128, 256, 128, torch.float16)
    x = torch.randn(70000, 256, device=dev()).to(torch.float16)
    ref = x.double() @ case.w_ref.double().t()
    assert rel_err(run_gemm(case, x, "small_m"), ref) < 1e-3
    assert rel_err(run_gemm(case, x, "tensor_core"), ref) < 1e-3


# ---- rtnq bench on the GPU ---------------------------------------------------------------------------------------------


def test_bench_times_every_path_and_checks_it(tmp_path):
    # `python -m rtnq.bench` end to end on the GPU (tiny shapes, few samples): every rtnq path runs through
    # ops.gemm on MarlinWeight copies, computes the right result, and the chosen thresholds are written.
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "RTNQ_DISPATCH_FILE": str(tmp_path / "dispatch.json")}
    env.pop("RTNQ_FORCE_PATH", None)
    p = subprocess.run([sys.executable, "-m", "rtnq.bench", "--synthetic", "tiny", "--bits", "4,8", "--batch", "1,16",
                        "--quick", "--json"], capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["env"]["device"] == "cuda" and doc["env"]["abi_version"] == library.ABI_VERSION
    recs = doc["records"]
    shapes_m = {(r["shape"], r["m"]) for r in recs}
    ours = [r for r in recs if r["role"] == "rtnq"]
    assert {(r["variant"], r["bits"], r["shape"], r["m"]) for r in ours} == {
        (f"rtnq:{p}", b, s, m) for p in ("small_m", "tensor_core", "dequant", "auto") for b in (4, 8) for s, m in shapes_m}
    assert all(r["check"] == "ok" and r["time_us"] > 0 for r in ours), [r for r in ours if r["check"] != "ok"][:3]
    for peer, bits in (("tinygemm", 4), ("int8pack", 8)):  # listed at every point: timed and right, or why not
        got = [r for r in recs if r["variant"] == peer]
        assert {(r["shape"], r["m"]) for r in got} == shapes_m and all(r["bits"] == bits for r in got)
        assert all((r["time_us"] and r["check"] == "ok") or r.get("unavailable") for r in got)
    assert [t["bits"] for t in doc["thresholds"]] == [4, 8]
    assert all(t["saved"] == str(tmp_path / "dispatch.json") for t in doc["thresholds"])
    assert all(s["time_ms"] and s["time_ms"] > 0 for s in doc["stack"]), doc["stack"]
