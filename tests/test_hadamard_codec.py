"""The compressed update codec in the shared core: rotation, stochastic rounding, bit packing and
the `hadamard` wire encoding's validation, on vectors the tests build (real numpy, no mocks)."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from fedkb_core import bitpack, hadamard, stochastic_rounding
from fedkb_core.update_encoding import BLOCK, UpdateEncoding, clip_inflation
from fedkb_core.wire import (LEVELS, SCALES, UpdateMetadata, UpdateRejected, WeightSpec, decode_update,
                             encode_update, read_header)

SPECS = [WeightSpec("emb", (300, 60)), WeightSpec("bias", (17,))]  # 18,017 coordinates: two blocks, odd tail
LENGTH = sum(s.size for s in SPECS)


def _deltas(seed=0, scale=0.01):
    rng = np.random.default_rng(seed)
    return {s.name: (scale * rng.normal(size=s.shape)).astype(np.float32) for s in SPECS}


def _flat(deltas):
    return np.concatenate([np.ravel(deltas[k]).astype(np.float64) for k in sorted(deltas)])


def _meta(**kw):
    base = dict(round_id=3, model_version=2, device_id="dev-1", num_examples=40, clip_norm=1.0, update_norm=0.5,
                encoding="hadamard", update_bits=4, rotation_seed=1234)
    return UpdateMetadata(**{**base, **kw})


# The rotation -------------------------------------------------------------------------------

def test_rotation_round_trips_and_pads_under_two_percent():
    x = np.random.default_rng(1).normal(size=3 * BLOCK + 17).astype(np.float32)
    y = hadamard.rotate(x, 77)
    assert y.shape == (4, BLOCK)
    np.testing.assert_allclose(hadamard.unrotate(y, 77, x.size), x, atol=2e-6 * np.abs(x).max())
    assert not np.allclose(hadamard.unrotate(y, 78, x.size), x, atol=0.1)  # another seed is another rotation
    model = 1_162_144  # the default export's parameters
    assert hadamard.padded_length(model) / model - 1 < 0.02


def test_rotation_is_orthogonal():
    """RᵀR = I on a basis sample, and norms and inner products are what they were (so L2 clipping
    commutes with the rotation)."""
    rng = np.random.default_rng(2)
    n = BLOCK + 100
    basis = np.zeros((6, n), np.float32)
    for row, i in enumerate((0, 1, 5000, BLOCK - 1, BLOCK, n - 1)):
        basis[row, i] = 1.0
    rotated = np.stack([hadamard.rotate(e, 5).ravel() for e in basis])
    np.testing.assert_allclose(rotated @ rotated.T, np.eye(6), atol=1e-6)
    a, b = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
    ra, rb = hadamard.rotate(a, 9).ravel(), hadamard.rotate(b, 9).ravel()
    assert float(ra @ ra) == pytest.approx(float(a @ a), rel=1e-5)
    assert float(ra @ rb) == pytest.approx(float(a @ b), rel=1e-4, abs=1e-2)
    # A spike is spread evenly: every coordinate of its block has magnitude 1/sqrt(BLOCK).
    np.testing.assert_allclose(np.abs(rotated[0, :BLOCK]), 1 / math.sqrt(BLOCK), rtol=1e-5)


def test_signs_are_the_raw_pcg64_bits_of_the_seed():
    """The signs are PCG64's raw stream, bit i of word i // 64 (least significant first), computed
    here with Python integers: a NumPy whose Generator methods changed would still agree."""
    seed = 2**62 + 12345
    words = np.random.PCG64(np.random.SeedSequence(seed)).random_raw(3)
    expected = [1.0 - 2.0 * ((int(words[i // 64]) >> (i % 64)) & 1) for i in range(150)]
    np.testing.assert_array_equal(hadamard.random_signs(seed, 150), expected)
    with pytest.raises(ValueError, match="rotation seed"):
        hadamard.random_signs(-1, 8)


# Bit packing --------------------------------------------------------------------------------

def _reference_pack(values, bits):
    """The little-endian bit stream, one Python int at a time."""
    stream = 0
    for i, v in enumerate(values):
        stream |= int(v) << (i * bits)
    return np.frombuffer(stream.to_bytes(bitpack.packed_size(len(values), bits), "little"), np.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trips_at_every_width_and_odd_sizes(bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 3, 7, 8, 9, 13, 64, 1001):
        values = rng.integers(0, 1 << bits, count).astype(np.uint8)
        packed = bitpack.pack(values, bits)
        assert packed.size == math.ceil(count * bits / 8)
        np.testing.assert_array_equal(packed, _reference_pack(values, bits))
        np.testing.assert_array_equal(bitpack.unpack(packed, bits, count), values)


def test_bit_packing_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        bitpack.pack(np.array([4], np.uint8), 2)
    with pytest.raises(ValueError, match="take 2 bytes"):
        bitpack.unpack(np.zeros(3, np.uint8), 3, 5)
    with pytest.raises(ValueError, match="unused bits"):
        bitpack.unpack(np.array([0, 0b1000_0000], np.uint8), 3, 5)  # 15 bits used, the 16th set
    with pytest.raises(ValueError, match="bits must be"):
        bitpack.pack(np.zeros(1, np.uint8), 33)


# Stochastic rounding ------------------------------------------------------------------------

def _variance_bound(scales, bits):
    """Σ_blocks d·Δ²/4 with Δ = 2s/(2^b − 1): the most variance stochastic rounding can add."""
    return float(np.sum(BLOCK * np.asarray(scales, np.float64) ** 2)) / stochastic_rounding.num_levels(bits) ** 2


def test_stochastic_rounding_is_unbiased():
    """The mean of K independent encodings of one vector converges to it like 1/√K.

    Each coordinate's error is independent, zero-mean and of variance at most Δ²/4, so the mean
    of K encodings errs by E‖ē‖² ≤ V/K with V = Σ d·Δ²/4 (`_variance_bound`). ‖ē‖² is a sum of
    2·16,384 independent bounded terms, so it concentrates within a few percent of its mean
    (Hoeffding): 1.5·V/K fails with probability far below 1e-9. A biased rounding (to nearest,
    say) would leave ‖ē‖ at its bias however large K, and fail the bound at K = 400.
    """
    x = np.random.default_rng(3).normal(size=(2, BLOCK)).astype(np.float32)
    x[1] *= 0.01  # a block of very different scale: each block has its own
    for bits in (1, 3):
        total, count = np.zeros_like(x, np.float64), 0
        errors = {}
        for k in range(400):
            levels, scales = stochastic_rounding.quantize(x, bits, np.random.default_rng(1000 + k))
            total += stochastic_rounding.dequantize(levels, scales, bits)
            count += 1
            if count in (25, 400):
                errors[count] = float(np.sum((total / count - x) ** 2))
        bound = _variance_bound(np.max(np.abs(x), axis=1), bits)
        assert errors[400] <= 1.5 * bound / 400, (bits, errors, bound)
        assert errors[25] / errors[400] == pytest.approx(16, rel=0.2)  # the 1/K fall of the squared error


def test_stochastic_rounding_keeps_zero_blocks_exact_and_levels_in_range():
    x = np.zeros((2, BLOCK), np.float32)
    x[0, :10] = np.linspace(-1, 1, 10)
    for bits in range(1, 9):
        levels, scales = stochastic_rounding.quantize(x, bits, np.random.default_rng(bits))
        assert levels.max() <= (1 << bits) - 1 and scales[1] == 0
        decoded = stochastic_rounding.dequantize(levels, scales, bits)
        assert np.all(decoded[1] == 0) and np.all(np.abs(decoded[0]) <= 1.0 + 1e-6)


def test_an_honest_decoded_update_stays_within_the_servers_allowance():
    """`clip_inflation(b)` bounds the decoded norm of an update clipped to C (what the server
    re-clips to without DP), at every b, on a dense and on a sparse update."""
    rng = np.random.default_rng(4)
    dense = rng.normal(size=LENGTH).astype(np.float32)
    sparse = np.zeros(LENGTH, np.float32)
    sparse[rng.choice(LENGTH, 40, replace=False)] = rng.normal(size=40)
    for x in (dense, sparse):
        x /= np.linalg.norm(x)  # clipped to C = 1 exactly
        for bits in range(1, 9):
            levels, scales = stochastic_rounding.quantize(hadamard.rotate(x, 11), bits, rng)
            norm = float(np.linalg.norm(stochastic_rounding.dequantize(levels, scales, bits)))
            assert 1.0 - 1e-3 <= norm <= clip_inflation(bits), (bits, norm)


# The wire encoding --------------------------------------------------------------------------

def test_hadamard_update_round_trips_within_its_variance():
    deltas = _deltas()
    body = encode_update(deltas, _meta(), rng=np.random.default_rng(5))
    update = decode_update(body, SPECS, expected=UpdateEncoding("hadamard", 4, 1234))
    assert update.metadata == _meta()
    assert {k: v.shape for k, v in update.deltas.items()} == {s.name: s.shape for s in SPECS}
    header, meta, _ = read_header(body)
    assert (meta["hadamard_length"], meta["hadamard_block"]) == (str(LENGTH), str(BLOCK))
    from safetensors.numpy import load

    bound = _variance_bound(load(body)[SCALES], 4)
    error = float(np.sum((_flat(update.deltas) - _flat(deltas)) ** 2))
    assert 0 < error <= 1.5 * bound  # concentrated: 2 blocks of independent terms
    _, _, data_start = read_header(body)  # the data is the packed levels and one float32 per block, nothing else
    assert len(body) - data_start == bitpack.packed_size(hadamard.padded_length(LENGTH), 4) + 4 * 2


def _with_header(body: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8: 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body[8 + n:]


def _body(**kw):
    return encode_update(_deltas(), _meta(**kw), rng=np.random.default_rng(6))


ASKED = UpdateEncoding("hadamard", 4, 1234)
FLOAT32 = dict(encoding="float32", update_bits=None, rotation_seed=None)


@pytest.mark.parametrize("make_body, expected, code", [
    (lambda: _body(update_bits=3), ASKED, "bits_mismatch"),
    (lambda: _body(rotation_seed=1235), ASKED, "seed_mismatch"),
    (lambda: _body(**FLOAT32), ASKED, "encoding_mismatch"),
    (lambda: _body(), UpdateEncoding("float32"), "encoding_mismatch"),
    (lambda: _body(encoding="float16", update_bits=None, rotation_seed=None), ASKED, "encoding_mismatch"),
    (lambda: _with_header(_body(), lambda h: h["__metadata__"].update(hadamard_length=str(LENGTH + 1))), ASKED,
     "length_mismatch"),
    (lambda: encode_update({"emb": _deltas()["emb"], "bias": np.zeros(18, np.float32)}, _meta()), ASKED,
     "length_mismatch"),
    (lambda: _with_header(_body(), lambda h: h[LEVELS].update(shape=[h[LEVELS]["shape"][0] - 1])), ASKED,
     "length_mismatch"),
    (lambda: _with_header(_body(), lambda h: h[SCALES].update(dtype="F16")), ASKED, "length_mismatch"),
    (lambda: _with_header(_body(), lambda h: h["__metadata__"].update(update_bits="9")), None, "bad_bits"),
    (lambda: _with_header(_body(), lambda h: h["__metadata__"].update(update_bits="0")), None, "bad_bits"),
    (lambda: _with_header(_body(), lambda h: h["__metadata__"].pop("rotation_seed")), None, "malformed_update"),
    (lambda: _with_header(_body(), lambda h: h["__metadata__"].update(rotation_seed="-4")), None, "malformed_update"),
    (lambda: _with_header(_body(), lambda h: h["__metadata__"].update(hadamard_block="65536")), None,
     "malformed_update"),
    (lambda: _with_header(_body(**FLOAT32), lambda h: h["__metadata__"].update(update_bits="4")), None,
     "malformed_update"),
    (lambda: _with_header(_body(), lambda h: h.update(extra=h[SCALES])), None, "weight_mismatch"),
    (lambda: _body()[:-40], None, "malformed_update"),
])
def test_malformed_or_mismatched_hadamard_updates_are_rejected(make_body, expected, code):
    with pytest.raises(UpdateRejected) as err:
        decode_update(make_body(), SPECS, max_examples=1000, expected=expected)
    assert err.value.code == code and err.value.message


def test_a_mismatch_is_found_in_the_header_before_any_data_is_read():
    """A body cut short after its header still gets the header's verdict (seed_mismatch), not
    `malformed_update`: the tensor data is never touched before the request is known to be right."""
    body = _body(rotation_seed=99)
    (n,) = struct.unpack("<Q", body[:8])
    with pytest.raises(UpdateRejected) as err:
        decode_update(body[: 8 + n], SPECS, expected=ASKED)
    assert err.value.code == "seed_mismatch"


def test_non_finite_or_negative_scales_are_rejected():
    body = _body()
    header, _, start = read_header(body)
    begin, _ = header[SCALES]["data_offsets"]
    for bad in (np.nan, -1.0):
        damaged = bytearray(body)
        damaged[start + begin: start + begin + 4] = np.float32(bad).tobytes()
        with pytest.raises(UpdateRejected) as err:
            decode_update(bytes(damaged), SPECS, expected=ASKED)
        assert err.value.code == "non_finite"


def test_encoding_requests_are_validated():
    assert UpdateEncoding("hadamard", 8, 0).problems() == []
    assert "update bits must be" in UpdateEncoding("hadamard", 9, 0).problems()[0]
    assert "rotation seed" in UpdateEncoding("hadamard", 8, None).problems()[0]
    assert UpdateEncoding("hadamard", 8, None).problems(needs_seed=False) == []
    assert "apply to the hadamard and secagg encodings only" in UpdateEncoding("float32", 8).problems()[0]
    assert "must be one of" in UpdateEncoding("int8").problems()[0]
    with pytest.raises(ValueError, match="update bits"):
        encode_update(_deltas(), _meta(update_bits=0))
