"""The GPTQ / compressed-tensors packing rules (rtnq.numerics.kpack) against hand-computed words (FORMATS.md 5, 6)."""

from __future__ import annotations

import pytest
import torch

from rtnq.numerics import kpack
from rtnq.errors import ShapeError


def test_4bit_word_is_lsb_first_along_k():
    codes = torch.arange(16, dtype=torch.uint8).view(1, 16)  # one row, k = 16: two words
    words = kpack.pack_rows(codes, 4)
    assert words.shape == (1, 2) and words.dtype == torch.int32
    assert words[0, 0].item() == 0x76543210
    assert words[0, 1].item() == 0xFEDCBA98 - (1 << 32)  # the top nibble set: negative as int32


def test_8bit_word_is_four_little_endian_bytes():
    codes = torch.tensor([[0x01, 0x80, 0xFF, 0x7F]], dtype=torch.uint8)
    assert kpack.pack_rows(codes, 8)[0, 0].item() == 0x7FFF8001


def test_gptq_qweight_is_the_transpose_of_compressed_tensors_weight_packed():
    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        codes = torch.randint(0, 2**bits, (64, 256), generator=g, dtype=torch.uint8)
        rows, cols = kpack.pack_rows(codes, bits), kpack.pack_cols(codes, bits)
        assert rows.shape == (64, 256 * bits // 32) and cols.shape == (256 * bits // 32, 64)
        assert torch.equal(cols, rows.t())
        assert torch.equal(kpack.unpack_rows(rows, bits), codes)
        assert torch.equal(kpack.unpack_cols(cols, bits), codes)


def test_gptq_column_word_holds_consecutive_k_of_one_output():
    codes = torch.zeros(3, 8, dtype=torch.uint8)
    codes[2] = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])  # output 2, k = 0..7
    q = kpack.pack_cols(codes, 4)
    assert q.shape == (1, 3)
    assert q[0, 2].item() == 0x87654321 - (1 << 32) and q[0, 0].item() == 0


def test_qzeros_are_the_v1_symmetric_constants():
    z4 = kpack.qzeros(4, groups=3, n=64)
    z8 = kpack.qzeros(8, groups=1, n=64)
    assert z4.shape == (3, 8) and z8.shape == (1, 16)
    assert (z4 == 2004318071).all() and (z8 == 2139062143).all()  # 0x77777777, 0x7F7F7F7F


def test_g_idx():
    assert kpack.g_idx(256, 128).tolist() == [0] * 128 + [1] * 128
    assert kpack.g_idx(64, 64).tolist() == [0] * 64
    assert kpack.g_idx(8, 8).dtype == torch.int32


def test_shape_errors():
    with pytest.raises(ShapeError, match="k=12"):
        kpack.pack_rows(torch.zeros(1, 12, dtype=torch.uint8), 4)
    with pytest.raises(ShapeError, match="bits"):
        kpack.pack_rows(torch.zeros(1, 16, dtype=torch.uint8), 3)
    with pytest.raises(ShapeError, match="n=12"):
        kpack.qzeros(4, 1, 12)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "marlin"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,group", [((64, 256), 128), ((104, 72), -1), ((3, 128, 512), 32), ((8, 8), 8)])
def test_numpy_constants_equal_the_torch_reference(fmt, bits, shape, group):
    """convert writes `Format.constants` (numpy, torch-free); verify re-derives with the torch reference."""
    from rtnq import formats

    f = formats.BY_NAME[fmt]
    got = f.constants(shape, bits, group)
    want = f.reference_constants(shape, bits, group)
    assert len(got) == len(want)
    for a, t in zip(got, want):
        assert a.dtype.name == str(t.dtype).removeprefix("torch.") and torch.equal(torch.from_numpy(a), t)


def test_numpy_qzeros_refuse_what_the_reference_refuses():
    from rtnq import formats
    from rtnq.errors import ShapeError

    with pytest.raises(ShapeError, match="n=12 is not a multiple of 8"):
        formats.GPTQ.constants((12, 128), 4, 128)
