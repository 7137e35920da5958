"""librtnq_cuda.so through ctypes: ABI, exported symbols, statuses, argument checks, no-GPU behaviour; and the
test-only librtnq_emu.so: the host references of the kernels' decode arithmetic (bit-exact against
rtnq.numerics.marlin + rtnq.numerics.rtn) and the kernels' own source run by the CPU SIMT emulator.

Skipped when a library is not built (scripts/test.sh builds it whenever nvcc exists). Tests that pass
fake device pointers run only on machines without a GPU, where the library must refuse before touching
them; argument-error tests run everywhere because arguments are checked before the device.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rtnq.numerics import marlin, rtn
from rtnq.errors import KernelError, KernelUnavailable, ShapeError
from rtnq.runtime import dispatch, library

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "cuda" / "include" / "rtnq_cuda.h"
DATA = Path(__file__).parent / "data"
P = ctypes.c_void_p
FAKE = 0x10000  # a 16-byte aligned address that is never dereferenced (no device present)

# Every test here needs a library that nvcc builds (librtnq_cuda.so or librtnq_emu.so), or reads the header it is
# built from. With RTNQ_REQUIRE_CUDA_BUILD=1 (scripts/test.sh after make) a skip here fails the run (conftest.py).
pytestmark = pytest.mark.nvcc
# The no-GPU tests skip on a machine with a GPU even when the library is built; that skip alone is allowed.
NO_GPU = pytest.mark.nvcc(allow_skip="a GPU is present")


@pytest.fixture(scope="module")
def lib():
    try:
        library.find_library()
    except KernelUnavailable as e:
        pytest.skip(f"CUDA library not built: {e}")
    return library.load()


@pytest.fixture(scope="module")
def has_gpu(lib) -> bool:
    n = ctypes.c_int32()
    return lib.rtnq_device_count(ctypes.byref(n)) == library.OK


@pytest.fixture()
def no_gpu(lib, has_gpu):
    if has_gpu:
        pytest.skip("a GPU is present; this checks the no-GPU behaviour")
    return lib


def last_error(lib) -> str:
    return lib.rtnq_last_error().decode()


# build/librtnq_emu.so is test-only (rtnq never loads it): the CPU SIMT emulator (rtnq_emu_*, see the emulated
# section below) and the kernels' host references (rtnq_host_*, cuda/emu/host_ref.h).
EMU_LIB = Path(os.environ.get("RTNQ_CUDA_EMU_LIB", ROOT / "cuda" / "build" / "librtnq_emu.so"))


@pytest.fixture(scope="module")
def emu():
    if not EMU_LIB.is_file():
        pytest.skip("cuda/build/librtnq_emu.so not built (make -C cuda)")
    e = ctypes.CDLL(str(EMU_LIB))
    e.rtnq_emu_last_error.restype = e.rtnq_host_last_error.restype = ctypes.c_char_p
    i64, i32, u32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_uint32
    e.rtnq_emu_dequantize.argtypes = [P, P, P, i64, i64, i32, i32, i32, i32, u32]
    for name in ("rtnq_emu_gemm_small_m", "rtnq_emu_gemm_tensor_core"):
        getattr(e, name).argtypes = [P, P, P, P, i64, i64, i64, i32, i32, i32, i32, u32]
    e.rtnq_host_dequantize.argtypes = [P, P, P, i64, i64, i32, i32, i32, i32, i32]
    for name in ("rtnq_host_gemm_small_m", "rtnq_host_gemm_tensor_core"):
        getattr(e, name).argtypes = [P, P, P, P, i64, i64, i64, i32, i32, i32, i32]
    return e


def host_error(emu) -> str:
    return emu.rtnq_host_last_error().decode()


def header_text() -> str:
    return HEADER.read_text()


# ---- ABI -------------------------------------------------------------------------------------------------


def test_abi_version_matches_header_and_binding(lib):
    declared = int(re.search(r"#define RTNQ_ABI_VERSION (\d+)", header_text()).group(1))
    assert lib.rtnq_abi_version() == declared == library.ABI_VERSION
    assert library.abi_version() == declared


def test_every_header_function_is_exported_and_bound(lib):
    declared = set(re.findall(r"RTNQ_API\s+[\w\s\*]+?\b(rtnq_\w+)\s*\(", header_text()))
    assert len(declared) >= 14
    assert declared == set(library.SIGNATURES), "binding table and header disagree"
    for name in declared:
        assert hasattr(lib, name), name


def test_only_the_api_is_exported(lib):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not installed")
    out = subprocess.run([nm, "-D", "--defined-only", str(library.loaded_path())], capture_output=True, text=True,
                         check=True).stdout
    symbols = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert symbols == set(library.SIGNATURES), f"unexpected exports: {sorted(symbols - set(library.SIGNATURES))}"
    assert not any(s.startswith("cuda") for s in symbols)  # the static runtime stays private


def test_built_library_exports_no_test_references():
    # Issue 11: the CPU references and the emulator are test code and live in librtnq_emu.so; the production
    # library's dynamic symbol table holds the rtnq_ API only. Checked on the built file itself, whatever
    # RTNQ_CUDA_LIB points at.
    so = ROOT / "cuda" / "build" / library.LIB_NAME
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not installed")
    if not so.is_file():
        pytest.skip("cuda/build/librtnq_cuda.so not built (make -C cuda)")
    out = subprocess.run([nm, "-D", "--defined-only", str(so)], capture_output=True, text=True, check=True).stdout
    symbols = [line.split()[-1] for line in out.splitlines() if line.strip()]
    assert symbols, "nm listed no symbols"
    assert not [s for s in symbols if s.startswith("rtnq_host_") or s.startswith("rtnq_emu_")]
    assert [s for s in symbols if not s.startswith("rtnq_")] == []


def test_enum_values_match_header():
    text = header_text()
    enums = {name: int(value) for name, value in re.findall(r"\b(RTNQ_[A-Z0-9_]+)\s*=\s*(\d+)", text)}
    for code, name in library.STATUS_NAMES.items():
        assert enums[name] == code
    assert enums["RTNQ_FLOAT16"] == library.FLOAT16 and enums["RTNQ_BFLOAT16"] == library.BFLOAT16
    assert enums["RTNQ_LAYOUT_KN"] == library.LAYOUT_KN and enums["RTNQ_LAYOUT_NK"] == library.LAYOUT_NK
    assert enums["RTNQ_PATH_SMALL_M"] == library.PATH_SMALL_M
    assert enums["RTNQ_PATH_TENSOR_CORE"] == library.PATH_TENSOR_CORE
    assert enums["RTNQ_PATH_DEQUANT"] == library.PATH_DEQUANT


def test_device_info_struct_matches_c_layout():
    # int32 x6, int64, int32 x2, char[256]: the int64 lands on offset 24 with no padding before it.
    assert library.DeviceInfo.total_memory.offset == 24
    assert library.DeviceInfo.name.offset == 40
    assert ctypes.sizeof(library.DeviceInfo) == 296


def test_status_strings(lib):
    expected = {
        0: "ok", 1: "invalid value", 2: "unsupported shape", 3: "misaligned pointer", 4: "workspace too small",
        5: "no CUDA device", 6: "GPU architecture not supported", 7: "no kernel for this GPU",
        8: "kernel launch failed", 9: "CUDA error",
    }
    for code, text in expected.items():
        assert lib.rtnq_status_string(code).decode() == text
    assert lib.rtnq_status_string(42).decode() == "unknown status"
    assert lib.rtnq_status_string(-1).decode() == "unknown status"


def test_build_info_and_versions(lib):
    info = lib.rtnq_build_info().decode()
    assert info.startswith("nvcc ") and "800" in info and "900" in info, info
    v = ctypes.c_int32()
    assert lib.rtnq_runtime_version(ctypes.byref(v)) == 0 and v.value >= 12000
    assert lib.rtnq_driver_version(ctypes.byref(v)) == 0 and v.value >= 0
    assert lib.rtnq_runtime_version(None) == library.ERR_INVALID_VALUE


def test_workspace_size_is_fixed_and_needs_no_gpu(lib):
    size = ctypes.c_size_t()
    assert lib.rtnq_workspace_size(ctypes.byref(size)) == 0
    assert size.value == 16 * 1024 + 16 * 1024 * 1024
    assert library.workspace_size() == size.value
    assert last_error(lib) == ""
    assert lib.rtnq_workspace_size(None) == library.ERR_INVALID_VALUE
    assert "must not be NULL" in last_error(lib)


def test_choose_path_agrees_with_python_dispatcher(lib):
    out = ctypes.c_int32()
    names = {library.PATH_SMALL_M: "small_m", library.PATH_TENSOR_CORE: "tensor_core", library.PATH_DEQUANT: "dequant"}
    for small, tc in [(8, 1024), (0, 0), (16, 16), (4, 300), (1, 0)]:
        th = dispatch.Thresholds(small, tc, measured=True)
        for m in [0, 1, 2, 4, 5, 8, 9, 16, 17, 300, 301, 1024, 1025, 100000]:
            assert lib.rtnq_choose_path(m, small, tc, ctypes.byref(out)) == 0
            assert names[out.value] == dispatch.choose_path(m, th), (m, small, tc)
    assert lib.rtnq_choose_path(-1, 8, 1024, ctypes.byref(out)) == library.ERR_INVALID_VALUE
    assert lib.rtnq_choose_path(1, -8, 1024, ctypes.byref(out)) == library.ERR_INVALID_VALUE
    assert lib.rtnq_choose_path(1, 8, 1024, None) == library.ERR_INVALID_VALUE


# ---- No GPU: every entry reports RTNQ_ERR_NO_DEVICE with a reason ----------------------------------------------


@NO_GPU
def test_device_queries_without_gpu(no_gpu):
    lib = no_gpu
    n = ctypes.c_int32(7)
    assert lib.rtnq_device_count(ctypes.byref(n)) == library.ERR_NO_DEVICE
    assert n.value == 0
    assert "driver" in last_error(lib) or "GPU" in last_error(lib)
    info = library.DeviceInfo()
    assert lib.rtnq_device_info_get(-1, ctypes.byref(info)) == library.ERR_NO_DEVICE
    assert last_error(lib)
    with pytest.raises(KernelUnavailable, match="no CUDA GPU available"):
        library.device_info()
    with pytest.raises(KernelUnavailable, match="no CUDA GPU available"):
        library.device_count()


def _gemm_args(m=4, n=128, k=256, bits=4, group=128, dtype=library.BFLOAT16, ws_bytes=None):
    ws = library.workspace_size() if ws_bytes is None else ws_bytes
    return [P(FAKE), P(FAKE), P(FAKE), P(FAKE), m, n, k, bits, group, dtype, P(FAKE), ws, None]


@NO_GPU
@pytest.mark.parametrize("entry", ["rtnq_gemm_small_m", "rtnq_gemm_tensor_core"])
@pytest.mark.parametrize("bits,group,dtype", [(4, 128, 1), (8, -1, 0), (4, 32, 0), (8, 64, 1)])
def test_gemm_without_gpu_reports_no_device(no_gpu, entry, bits, group, dtype):
    lib = no_gpu
    status = getattr(lib, entry)(*_gemm_args(bits=bits, group=group, dtype=dtype))
    assert status == library.ERR_NO_DEVICE
    assert lib.rtnq_status_string(status).decode() == "no CUDA device"
    assert last_error(lib).startswith("cudaGetDevice:")
    with pytest.raises(KernelUnavailable, match="no CUDA device"):
        library.check(status, entry)


@NO_GPU
@pytest.mark.parametrize("layout", [library.LAYOUT_KN, library.LAYOUT_NK])
def test_dequantize_without_gpu_reports_no_device(no_gpu, layout):
    lib = no_gpu
    status = lib.rtnq_dequantize(P(FAKE), P(FAKE), P(FAKE), 128, 256, 8, 128, 0, layout, None)
    assert status == library.ERR_NO_DEVICE
    assert last_error(lib)


@NO_GPU
def test_plan_without_gpu_reports_no_device(no_gpu):
    lib = no_gpu
    s, r = ctypes.c_int32(), ctypes.c_int32()
    for path in (library.PATH_SMALL_M, library.PATH_TENSOR_CORE):
        assert lib.rtnq_gemm_plan(path, 16, 4096, 4096, 4, 128, 1, ctypes.byref(s), ctypes.byref(r)) == library.ERR_NO_DEVICE


# ---- Argument checks (before any device access: same result with or without a GPU) -----------------------------


@pytest.mark.parametrize(
    "change,status,needle",
    [
        ({"bits": 5}, library.ERR_INVALID_VALUE, "bits must be 4 or 8, got 5"),
        ({"group": 48}, library.ERR_INVALID_VALUE, "group_size must be 32, 64, 128 or -1"),
        ({"dtype": 7}, library.ERR_INVALID_VALUE, "dtype must be"),
        ({"n": 100}, library.ERR_SHAPE, "n=100 (out_features) is not a multiple of 64"),
        ({"k": 200}, library.ERR_SHAPE, "k=200 (in_features) is not a multiple of 128"),
        ({"n": 0}, library.ERR_SHAPE, "must be positive"),
        ({"m": -1}, library.ERR_INVALID_VALUE, "m must be >= 0"),
        ({"ws_bytes": 1024}, library.ERR_WORKSPACE, "smaller than rtnq_workspace_size()"),
    ],
)
@pytest.mark.parametrize("entry", ["rtnq_gemm_small_m", "rtnq_gemm_tensor_core"])
def test_gemm_argument_errors(lib, entry, change, status, needle):
    kw = {"m": 4, "n": 128, "k": 256, "bits": 4, "group": 128, "dtype": library.BFLOAT16, "ws_bytes": None}
    kw.update(change)
    got = getattr(lib, entry)(*_gemm_args(**kw))
    assert got == status, last_error(lib)
    assert needle in last_error(lib)


def test_gemm_null_and_misaligned_pointers(lib):
    args = _gemm_args()
    args[0] = None  # x
    assert lib.rtnq_gemm_small_m(*args) == library.ERR_INVALID_VALUE
    assert "x and out must not be NULL" in last_error(lib)
    args = _gemm_args()
    args[1] = None  # qweight
    assert lib.rtnq_gemm_tensor_core(*args) == library.ERR_INVALID_VALUE
    args = _gemm_args()
    args[2] = P(FAKE + 2)  # scales
    assert lib.rtnq_gemm_tensor_core(*args) == library.ERR_ALIGNMENT
    assert "scales" in last_error(lib) and "16-byte aligned" in last_error(lib)
    args = _gemm_args()
    args[10] = None  # workspace
    assert lib.rtnq_gemm_small_m(*args) == library.ERR_WORKSPACE


def test_dequantize_argument_errors(lib):
    assert lib.rtnq_dequantize(P(FAKE), P(FAKE), P(FAKE), 128, 256, 4, 128, 1, 5, None) == library.ERR_INVALID_VALUE
    assert "layout" in last_error(lib)
    assert lib.rtnq_dequantize(P(FAKE), P(FAKE), None, 128, 256, 4, 128, 1, 0, None) == library.ERR_INVALID_VALUE
    assert lib.rtnq_dequantize(P(FAKE), P(FAKE), P(FAKE), 96, 256, 4, 128, 1, 0, None) == library.ERR_SHAPE
    assert lib.rtnq_dequantize(P(FAKE + 8), P(FAKE), P(FAKE), 128, 256, 4, 128, 1, 0, None) == library.ERR_ALIGNMENT


def test_plan_argument_errors(lib):
    s, r = ctypes.c_int32(), ctypes.c_int32()
    assert lib.rtnq_gemm_plan(3, 16, 4096, 4096, 4, 128, 1, ctypes.byref(s), ctypes.byref(r)) == library.ERR_INVALID_VALUE
    assert lib.rtnq_gemm_plan(1, 0, 4096, 4096, 4, 128, 1, ctypes.byref(s), ctypes.byref(r)) == library.ERR_INVALID_VALUE
    assert lib.rtnq_gemm_plan(1, 16, 4000, 4096, 4, 128, 1, ctypes.byref(s), ctypes.byref(r)) == library.ERR_SHAPE


def test_error_mapping_to_python_types(lib):
    lib.rtnq_gemm_small_m(*_gemm_args(n=100))
    with pytest.raises(ShapeError, match=r"unsupported shape \(n=100"):
        library.check(library.ERR_SHAPE, "rtnq_gemm_small_m")
    with pytest.raises(KernelError, match="kernel launch failed"):
        library.check(library.ERR_LAUNCH, "x")
    for status in library.UNAVAILABLE:
        assert isinstance(library.error_for(status, "x"), KernelUnavailable)
    library.check(library.OK, "x")  # no error


# ---- Python loader failures -------------------------------------------------------------------------------------


def test_env_var_pointing_nowhere(monkeypatch, tmp_path, lib):
    monkeypatch.setenv(library.ENV_VAR, str(tmp_path / "missing.so"))
    library.reset()
    try:
        with pytest.raises(KernelUnavailable, match="does not exist"):
            library.load()
    finally:
        monkeypatch.delenv(library.ENV_VAR)
        library.reset()


def test_env_var_pointing_at_a_non_library(monkeypatch, tmp_path, lib):
    bogus = tmp_path / "librtnq_cuda.so"
    bogus.write_text("not an ELF file")
    monkeypatch.setenv(library.ENV_VAR, str(bogus))
    library.reset()
    try:
        with pytest.raises(KernelUnavailable, match="cannot load"):
            library.load()
    finally:
        monkeypatch.delenv(library.ENV_VAR)
        library.reset()


def test_wrong_abi_version_is_refused(monkeypatch, tmp_path, lib):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a fake library")
    src = tmp_path / "fake.c"
    names = [n for n in library.SIGNATURES if n != "rtnq_abi_version"]
    src.write_text("int rtnq_abi_version(void) { return 999; }\n" + "".join(f"int {n}(void) {{ return 0; }}\n" for n in names))
    so = tmp_path / "librtnq_cuda.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    monkeypatch.setenv(library.ENV_VAR, str(so))
    library.reset()
    try:
        needs = f"ABI version 999 but this rtnq needs {library.ABI_VERSION}; rebuild"
        with pytest.raises(KernelUnavailable, match=needs):
            library.load()
    finally:
        monkeypatch.delenv(library.ENV_VAR)
        library.reset()


# ---- Host references (librtnq_emu.so): the kernels' decode arithmetic, executed on the CPU ------------------------

DT = {torch.float16: library.FLOAT16, torch.bfloat16: library.BFLOAT16}


def host_dequantize(emu, qweight, scales, n, k, bits, group, layout, variant):
    shape = (k, n) if layout == library.LAYOUT_KN else (n, k)
    out = torch.full(shape, float("nan"), dtype=scales.dtype)
    status = emu.rtnq_host_dequantize(qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), n, k, bits, group,
                                      DT[scales.dtype], layout, variant)
    assert status == 0, host_error(emu)
    return out if layout == library.LAYOUT_NK else out.t()


def host_gemm(emu, fn, x, qweight, scales, n, k, bits, group, splits):
    out = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype)
    status = getattr(emu, fn)(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), x.shape[0], n, k,
                              bits, group, DT[x.dtype], splits)
    assert status == 0, host_error(emu)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [128, 64, 32, -1])
@pytest.mark.parametrize("n,k", [(192, 384), (64, 128), (256, 512)])
def test_host_dequantize_is_bit_exact(emu, bits, dtype, group, n, k):
    gen = torch.Generator().manual_seed(1000 * bits + n + k + group)
    w = torch.randn(n, k, generator=gen).to(dtype)
    w[0, :32] = 0  # an all-zero group: scale 0, exact zeros
    codes, scales = rtn.quantize(w, bits, group)
    qweight, scales_p = marlin.pack(codes, scales, bits)
    ref = rtn.dequantize(codes, scales, bits, group)
    for layout in (library.LAYOUT_KN, library.LAYOUT_NK):
        for variant in (0, 1):  # the dequantize kernel's arithmetic and the GEMM kernels' fragment decode
            got = host_dequantize(emu, qweight, scales_p, n, k, bits, group, layout, variant)
            assert same_bits(got, ref), (layout, variant)


def test_host_dequantize_single_group_uses_channelwise_table(emu):
    # k == group_size: one scale row, which the Marlin layout permutes with the channelwise table.
    w = torch.randn(128, 128).to(torch.bfloat16)
    codes, scales = rtn.quantize(w, 4, 128)
    qweight, scales_p = marlin.pack(codes, scales, 4)
    got = host_dequantize(emu, qweight, scales_p, 128, 128, 4, 128, library.LAYOUT_NK, 0)
    assert same_bits(got, rtn.dequantize(codes, scales, 4, 128))


@pytest.mark.parametrize("name,bits", [("marlin_w4_k512_n768_g128", 4), ("marlin_w8_k256_n256_g128", 8)])
def test_host_dequantize_reads_vllm_packed_tensors(emu, name, bits):
    # Independent oracle: tensors packed by vLLM's own marlin_weights / marlin_permute_scales (tests/data).
    t = load_file(str(DATA / f"{name}.safetensors"))
    codes_kn, scales_gn = t["codes"], t["scales"]
    k, n = codes_kn.shape
    ref = ((codes_kn.to(torch.int16) - (1 << (bits - 1))).to(torch.float16) * scales_gn.repeat_interleave(128, 0)).t()
    for variant in (0, 1):
        got = host_dequantize(emu, t["marlin_vllm_qweight"], t["marlin_vllm_scales"], n, k, bits, 128,
                              library.LAYOUT_NK, variant)
        assert same_bits(got, ref.contiguous())


def test_host_dequantize_extreme_codes(emu):
    # Every code value, including the -8 / +7 (-128 / +127) ends, through both decoders.
    for bits in (4, 8):
        n, k = 64, 256
        codes = (torch.arange(n * k) % (1 << bits)).to(torch.uint8).reshape(n, k)
        scales = torch.linspace(1e-3, 3.0, n * 2).reshape(n, 2).to(torch.bfloat16)
        qweight, scales_p = marlin.pack(codes, scales, bits)
        ref = rtn.dequantize(codes, scales, bits, 128)
        for variant in (0, 1):
            assert same_bits(host_dequantize(emu, qweight, scales_p, n, k, bits, 128, library.LAYOUT_NK, variant), ref)


def _gemm_case(bits, dtype, group, n, k, m, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(dtype)
    codes, scales = rtn.quantize(w, bits, group)
    qweight, scales_p = marlin.pack(codes, scales, bits)
    w_deq = rtn.dequantize(codes, scales, bits, group)
    x = torch.randn(m, k, generator=gen).to(dtype)
    return x, qweight, scales_p, w_deq


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # GPU.md 4.2: fp32 accumulation, output rounding dominates


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [128, -1, 32])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 9, 17])
def test_host_small_m_emulation_matches_reference(emu, bits, dtype, group, m):
    n, k = 192, 512
    x, qweight, scales, w_deq = _gemm_case(bits, dtype, group, n, k, m, seed=m + bits)
    ref = x.double() @ w_deq.double().t()
    for splits in (1, 4):
        out = host_gemm(emu, "rtnq_host_gemm_small_m", x, qweight, scales, n, k, bits, group, splits)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL[dtype], splits


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,m,n,k,splits", [
    (128, 1, 192, 384, 1),    # TcSmall, n not a multiple of the 128-column tile
    (-1, 16, 128, 512, 2),    # TcSmall, channelwise, split-K
    (64, 17, 320, 256, 1),    # TcMid, 5 column blocks in 256-column tiles
    (128, 33, 256, 512, 3),   # TcLarge, rows beyond m in the tile, uneven split-K
    (32, 70, 64, 256, 2),     # TcLarge, two m-tiles, group 32 (several scale rows per stage)
])
def test_host_tensor_core_emulation_matches_reference(emu, bits, dtype, group, m, n, k, splits):
    x, qweight, scales, w_deq = _gemm_case(bits, dtype, group, n, k, m, seed=m * 7 + bits)
    ref = x.double() @ w_deq.double().t()
    out = host_gemm(emu, "rtnq_host_gemm_tensor_core", x, qweight, scales, n, k, bits, group, splits)
    assert torch.isfinite(out).all(), "an output element was never written"
    assert rel_err(out, ref) < TOL[dtype]


def test_host_reference_argument_errors(emu):
    t = torch.zeros(64, dtype=torch.int32)
    assert emu.rtnq_host_dequantize(t.data_ptr(), t.data_ptr(), t.data_ptr(), 64, 128, 3, 128, 0, 0, 0) == library.ERR_INVALID_VALUE
    assert emu.rtnq_host_dequantize(t.data_ptr(), t.data_ptr(), t.data_ptr(), 64, 128, 4, 128, 0, 0, 2) == library.ERR_INVALID_VALUE
    assert emu.rtnq_host_dequantize(t.data_ptr(), t.data_ptr(), t.data_ptr(), 60, 128, 4, 128, 0, 0, 0) == library.ERR_SHAPE
    assert emu.rtnq_host_gemm_small_m(t.data_ptr(), t.data_ptr(), t.data_ptr(), t.data_ptr(), 1, 64, 128, 4, 128, 0, 0) == library.ERR_INVALID_VALUE
    assert "splits" in host_error(emu)
    assert emu.rtnq_host_gemm_tensor_core(None, t.data_ptr(), t.data_ptr(), t.data_ptr(), 1, 64, 128, 4, 128, 0, 1) == library.ERR_INVALID_VALUE


# ---- The kernels' own source, executed by the CPU SIMT emulator (cuda/emu) ----------------------------------------
# build/librtnq_emu.so compiles dequant_kernel.cuh, small_m_kernel.cuh and tc_kernel.cuh for the host: CUDA threads
# become fibers, __syncthreads and the warp collectives (shuffles, ldmatrix, mma.sync) wait for all participants,
# cp.async copies land only when cp.async.wait_group completes them, every buffer ends at an inaccessible page, and a
# nonzero seed shuffles thread and block order and lets warps drift apart. A missing barrier, a wrong pipeline wait or
# ring slot, a fragment mix-up, a missing shuffle, a split-K counter left non-zero, or a read/write past the end of
# x, out or the workspace fails here (each was checked by planting it). Not covered: blocks running at the same time
# (they run one after another, in shuffled order), bank conflicts, speed.

def emu_gemm(emu, fn, x, qweight, scales, n, k, bits, group, splits, seed):
    out = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype)
    status = getattr(emu, fn)(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), x.shape[0], n, k,
                              bits, group, DT[x.dtype], splits, seed)
    assert status == 0, emu.rtnq_emu_last_error().decode()
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [128, 32, -1])
def test_emulated_dequantize_kernel_is_bit_exact(emu, bits, dtype, group):
    n, k = 192, 384
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits + abs(group))).to(dtype)
    codes, scales = rtn.quantize(w, bits, group)
    qweight, scales_p = marlin.pack(codes, scales, bits)
    ref = rtn.dequantize(codes, scales, bits, group)
    for layout, seed in ((library.LAYOUT_NK, 0), (library.LAYOUT_KN, 0), (library.LAYOUT_NK, 5)):
        out = torch.full((n, k) if layout == library.LAYOUT_NK else (k, n), float("nan"), dtype=dtype)
        status = emu.rtnq_emu_dequantize(qweight.data_ptr(), scales_p.data_ptr(), out.data_ptr(), n, k, bits, group,
                                         DT[dtype], layout, seed)
        assert status == 0, emu.rtnq_emu_last_error().decode()
        assert same_bits(out if layout == library.LAYOUT_NK else out.t(), ref), (layout, seed)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,m,splits", [(128, 1, 1), (-1, 2, 3), (64, 3, 2), (128, 8, 4), (32, 9, 1), (-1, 17, 2)])
def test_emulated_small_m_kernel(emu, bits, dtype, group, m, splits):
    n, k = 192, 512
    x, qweight, scales, w_deq = _gemm_case(bits, dtype, group, n, k, m, seed=3 * m + bits)
    ref = x.double() @ w_deq.double().t()
    out = emu_gemm(emu, "rtnq_emu_gemm_small_m", x, qweight, scales, n, k, bits, group, splits, seed=0)
    assert rel_err(out, ref) < TOL[dtype]
    # The host reference repeats the kernel's operation order: equal bits (so GPU runs can be compared bitwise).
    host = host_gemm(emu, "rtnq_host_gemm_small_m", x, qweight, scales, n, k, bits, group, splits)
    assert same_bits(out, host)
    shuffled = emu_gemm(emu, "rtnq_emu_gemm_small_m", x, qweight, scales, n, k, bits, group, splits, seed=11)
    assert same_bits(shuffled, out), "result depends on thread/block order"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,m,n,k,splits", [
    (128, 1, 192, 384, 1),    # TcSmall (m <= 16), partial 128-column tile
    (-1, 16, 128, 512, 2),    # TcSmall, channelwise, split-K
    (64, 5, 256, 1024, 4),    # TcSmall, 4 splits, several stages each
    (128, 17, 320, 256, 1),   # TcMid, 5 blocks in 256-column tiles
    (32, 32, 64, 512, 3),     # TcMid, group 32: four scale rows per stage
    (128, 33, 256, 512, 2),   # TcLarge, rows beyond m
    (-1, 70, 192, 256, 1),    # TcLarge, two m-tiles, channelwise
])
def test_emulated_tensor_core_kernel(emu, bits, dtype, group, m, n, k, splits):
    x, qweight, scales, w_deq = _gemm_case(bits, dtype, group, n, k, m, seed=5 * m + bits)
    ref = x.double() @ w_deq.double().t()
    out = emu_gemm(emu, "rtnq_emu_gemm_tensor_core", x, qweight, scales, n, k, bits, group, splits, seed=0)
    assert torch.isfinite(out).all(), "an output element was never written"
    assert rel_err(out, ref) < TOL[dtype]
    shuffled = emu_gemm(emu, "rtnq_emu_gemm_tensor_core", x, qweight, scales, n, k, bits, group, splits, seed=7)
    assert same_bits(shuffled, out), "result depends on thread/block order"


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_emulated_kernels_under_many_schedules(emu, seed):
    # Last pipeline slot overlapping the reduction buffer, partial tiles, split-K: the shapes where a missing
    # barrier or an early counter reset would show, under several drifting schedules.
    x, qweight, scales, w_deq = _gemm_case(4, torch.bfloat16, 128, 192, 512, 40, seed=seed)
    ref = x.double() @ w_deq.double().t()
    base = emu_gemm(emu, "rtnq_emu_gemm_tensor_core", x, qweight, scales, 192, 512, 4, 128, 4, seed=0)
    again = emu_gemm(emu, "rtnq_emu_gemm_tensor_core", x, qweight, scales, 192, 512, 4, 128, 4, seed=seed)
    assert rel_err(base, ref) < TOL[torch.bfloat16] and same_bits(again, base)
    base = emu_gemm(emu, "rtnq_emu_gemm_small_m", x[:6], qweight, scales, 192, 512, 4, 128, 3, seed=0)
    again = emu_gemm(emu, "rtnq_emu_gemm_small_m", x[:6], qweight, scales, 192, 512, 4, 128, 3, seed=seed)
    assert same_bits(again, base)
