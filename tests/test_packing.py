"""Bit packing and the per-codes packed formats: oracles, golden bytes, round trips, accounting."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from packed_codes import HAND_BUILT, binary_codes, partial_codes, uniform_codes

import binllm.packed.packing
from binllm.methods import METHODS, get_method
from binllm.methods.codes import BinaryCodes
from binllm.packed.layout import PackedLayout, pack, unpack
from binllm.packed.packing import PackingError, pack_bits, pack_uint, unpack_bits, unpack_uint
from binllm.engine.reconstruct import reconstruct


def disk_bits(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values())


def test_docstring_examples_hold():
    result = doctest.testmod(binllm.packed.packing)
    assert result.attempted >= 3 and result.failed == 0


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 17), (2, 5, 64), (4, 172)])
def test_pack_bits_equals_numpy_packbits_little(shape):
    g = torch.Generator().manual_seed(sum(shape))
    bits = torch.rand(shape, generator=g) > 0.5
    packed = pack_bits(bits)
    oracle = np.packbits(bits.numpy(), axis=-1, bitorder="little")
    assert packed.dtype == torch.uint8
    np.testing.assert_array_equal(packed.numpy(), oracle)
    assert torch.equal(unpack_bits(packed, shape[-1]), bits)


def test_unpack_bits_refuses_a_stream_of_the_wrong_length():
    with pytest.raises(PackingError, match="needs 2 uint8 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 9)


@pytest.mark.parametrize("nbits", range(1, 9))
@pytest.mark.parametrize("n", [1, 5, 13, 100])
def test_pack_uint_round_trip_and_naive_bit_string(nbits, n):
    g = torch.Generator().manual_seed(nbits * 1000 + n)
    values = torch.randint(0, 2 ** nbits, (n,), generator=g)
    packed = pack_uint(values, nbits)
    # oracle: concatenate each value's bits LSB first, cut into bytes, each byte little-endian
    stream = "".join(format(int(v), f"0{nbits}b")[::-1] for v in values)
    stream += "0" * (-len(stream) % 8)
    expected = [int(stream[i:i + 8][::-1], 2) for i in range(0, len(stream), 8)]
    assert packed.tolist() == expected
    assert torch.equal(unpack_uint(packed, n, nbits).long(), values)


def test_pack_uint_refuses_values_that_do_not_fit():
    with pytest.raises(PackingError, match="do not fit unsigned 2-bit"):
        pack_uint(torch.tensor([0, 4]), 2)
    with pytest.raises(PackingError, match="do not fit"):
        pack_uint(torch.tensor([0.5]), 3)
    with pytest.raises(PackingError, match="only hold zeros"):
        pack_uint(torch.tensor([1]), 0)


@pytest.mark.parametrize("kind", list(HAND_BUILT))
def test_round_trip_reproduces_dequantize_exactly(kind):
    codes = HAND_BUILT[kind]()
    layout, tensors = pack(codes)
    back = unpack(layout, tensors)
    assert type(back) is type(codes)
    assert torch.equal(back.dequantize(), codes.dequantize())
    assert back.paper_bits() == codes.paper_bits()


@pytest.mark.parametrize("kind", list(HAND_BUILT))
def test_bits_on_disk_equal_the_codes_accounting(kind):
    codes = HAND_BUILT[kind]()
    layout, tensors = pack(codes)
    assert disk_bits(tensors) == codes.stored_bits() == layout.stored_bits()
    assert unpack(layout, tensors).stored_bits() == codes.stored_bits()


@pytest.mark.parametrize("kind", list(HAND_BUILT))
def test_shapes_follow_from_the_layout_alone(kind):
    layout, tensors = pack(HAND_BUILT[kind]())
    again = PackedLayout.from_dict(layout.to_dict())  # what config.json round-trips
    specs = again.specs()
    assert set(specs) == set(tensors)
    for key, spec in specs.items():
        assert (tuple(tensors[key].shape), tensors[key].dtype) == (spec.shape, spec.dtype)


def test_billm_layout_stores_the_second_plane_only_over_salient_columns():
    codes = binary_codes(rows=5, cols=77, orders=(2, 1, 1), n_salient=1)
    _, t = pack(codes)
    S = int(codes.salient_cols.sum())
    assert t["signs0"].numel() == -(-5 * 77 // 8)          # plane 0: every weight
    assert t["signs1"].numel() == -(-5 * S // 8)            # plane 1: salient columns only
    assert "group_salient" not in t                           # one salient group: 0 bits
    assert t["group_rest"].numel() == -(-5 * (77 - S) // 8)  # two other groups: 1 bit each
    assert t["salient_cols"].numel() == -(-77 // 8)
    assert t["alpha"].shape == (4, 5, 3)                      # pairs (0,0) (0,1) (1,0) (2,0)


def test_golden_bytes_of_a_hand_worked_rtn_layer():
    signs = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1],
                          [1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    codes = BinaryCodes(group=torch.zeros(2, 9, dtype=torch.uint8), signs=signs[None],
                        alpha=torch.tensor([0.5, 0.25]).reshape(1, 1, 2, 1),
                        mu=torch.tensor([1.0, -2.0]).reshape(1, 2, 1), beta=None,
                        salient_cols=torch.zeros(9, dtype=torch.bool), orders=(1,), n_salient=0,
                        block_size=9)
    layout, t = pack(codes)
    # row-major stream 101100001 111111110: byte 0 = bits 0–7 = 1+4+8; byte 1 = bit 8 of row 0
    # and bits 0–6 of row 1 = 255; byte 2 = bits 7, 8 of row 1 (1, 0) = 1
    assert t["signs0"].tolist() == [13, 255, 1]
    assert t["alpha"].dtype == torch.float16 and t["alpha"].flatten().tolist() == [0.5, 0.25]
    assert set(t) == {"signs0", "alpha", "mu"}
    assert disk_bits(t) == 3 * 8 + 2 * 16 + 2 * 16 == codes.stored_bits()
    expected = torch.tensor([[1.5, 0.5, 1.5, 1.5, 0.5, 0.5, 0.5, 0.5, 1.5],
                             [-1.75] * 8 + [-2.25]])
    assert torch.equal(unpack(layout, t).dequantize(), expected)


def test_scales_not_rounded_to_fp16_are_refused():
    codes = binary_codes(orders=(1,), n_salient=0)
    bad = BinaryCodes(**{**codes.__dict__, "alpha": codes.alpha + 1e-7})
    with pytest.raises(PackingError, match="not exact in fp16.*to_storage"):
        pack(bad)


def test_groups_that_do_not_match_the_salient_columns_are_refused():
    codes = binary_codes()
    group = codes.group.clone()
    group[0, (~codes.salient_cols).nonzero()[0, 0]] = 0  # a salient group in a non-salient column
    with pytest.raises(PackingError, match="salient columns"):
        pack(BinaryCodes(**{**codes.__dict__, "group": group}))


def test_unpack_refuses_missing_and_misshapen_tensors():
    layout, t = pack(uniform_codes())
    with pytest.raises(PackingError, match="missing tensors \\['zero'\\]"):
        unpack(layout, {k: v for k, v in t.items() if k != "zero"})
    with pytest.raises(PackingError, match="scale: expected torch.float16"):
        unpack(layout, {**t, "scale": t["scale"][:, :1]})


def test_unknown_format_and_malformed_layouts_are_refused():
    with pytest.raises(PackingError, match="unknown packed format 'ternary'"):
        PackedLayout.from_dict({"format": "ternary", "shape": [2, 2], "params": {}})
    with pytest.raises(PackingError, match="malformed"):
        PackedLayout.from_dict({"format": "uniform"})
    with pytest.raises(PackingError, match="salient columns of 10"):
        PackedLayout("binary", 2, 10, {"orders": [1], "n_salient": 0, "planes": 1,
                                       "block_size": 4, "mean": True, "column_scales": False,
                                       "salient_columns": 3})


def test_corrupt_salient_bitmap_is_detected():
    layout, t = pack(partial_codes())
    flipped = t["salient"].clone()
    flipped[0] ^= 1
    with pytest.raises(PackingError, match="corrupt"):
        unpack(layout, {**t, "salient": flipped})


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_packs_losslessly(name):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 76, generator=g)
    X = torch.randn(200, 76, generator=g)
    rec = reconstruct(W, X.T @ X, get_method(name), block_size=64)
    layout, tensors = pack(rec.codes)
    assert torch.equal(unpack(layout, tensors).dequantize(), rec.Q)
    assert disk_bits(tensors) == rec.codes.stored_bits()


@pytest.mark.parametrize("nbits,per_row", [(4, 6), (4, 3), (8, 5), (3, 5), (1, 16)])
def test_unpack_uint_rows_equals_unpacking_everything_then_indexing(nbits, per_row):
    """Oracle: the whole stream unpacked, then the rows picked (whole-byte rows or not)."""
    from binllm.packed.packing import unpack_uint_rows

    rows = 7
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 2 ** nbits, (rows * per_row,), generator=gen)
    packed = pack_uint(values, nbits)
    ids = torch.tensor([6, 0, 3, 3])
    want = unpack_uint(packed, rows * per_row, nbits).view(rows, per_row)[ids]
    assert torch.equal(unpack_uint_rows(packed, rows, per_row, nbits, ids), want)
