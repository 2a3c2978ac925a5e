"""``_native.describe``: the packed tm_tensor bytes, and the cache of their metadata part.

The bytes are read by the library as a ``tm_tensor`` (include/turbomoe/turbomoe.h), so each test
decodes them through the ctypes mirror of that struct (whose layout test_abi checks against the
header) and compares every field with the tensor's own metadata.
"""

from __future__ import annotations

import pytest
import torch

from turbomoe import _native
from turbomoe.ops import activation


def decoded(t: torch.Tensor) -> _native.TmTensor:
    packed = _native.describe(t)
    assert isinstance(packed, bytes)
    assert len(packed) == len(bytes(_native.TmTensor()))
    return _native.TmTensor.from_buffer_copy(packed)


def assert_describes(t: torch.Tensor) -> None:
    d = decoded(t)
    assert d.data == (t.data_ptr() if t.numel() > 0 else None)  # ctypes reads a null as None
    assert d.dtype == _native.DTYPE_CODES[t.dtype]
    assert d.device_type == _native.DEVICE_CPU
    assert d.device_index == 0
    assert d.ndim == t.dim()
    pad = _native.MAX_DIMS - t.dim()
    assert list(d.sizes) == [*t.shape, *([0] * pad)]
    assert list(d.strides) == [*t.stride(), *([0] * pad)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(5, 7),
        lambda: torch.randn(5, 7).t(),  # a view: strides (1, 7)
        lambda: torch.randn(3, 4, 6)[:, 1:, ::2],  # offset data pointer, stride 2
        lambda: torch.zeros((), dtype=torch.int64),  # rank 0
        lambda: torch.empty(0, 9, dtype=torch.bfloat16),  # empty: null data
        lambda: torch.ones(1, 2, 1, 3, 1, 2, dtype=torch.int32),  # the largest rank
        lambda: torch.randn(2, 3).to(torch.float16),
    ],
)
def test_describe_packs_every_field(make):
    assert_describes(make())


def test_same_metadata_reuses_the_cached_part_with_each_tensors_own_pointer():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert a.data_ptr() != b.data_ptr()
    assert_describes(a)
    assert_describes(b)  # a cache hit: only the pointer differs
    assert decoded(a).data != decoded(b).data
    assert _native.describe(a)[8:] == _native.describe(b)[8:]


def test_tensors_that_differ_only_in_strides_or_dtype_are_told_apart():
    x = torch.randn(6, 6)
    for t in (x, x.t(), x.to(torch.bfloat16), x.to(torch.bfloat16).t()):
        assert_describes(t)


def test_none_is_a_null_pointer():
    assert _native.describe(None) is None


def test_a_meta_tensor_is_refused_even_after_a_cpu_tensor_of_its_shape():
    assert_describes(torch.randn(3, 5))
    with pytest.raises(ValueError, match="cpu and cuda tensors, not meta"):
        _native.describe(torch.empty(3, 5, device="meta"))


def test_unsupported_dtype_and_rank_are_refused_every_time():
    for _ in range(2):  # nothing invalid is cached
        with pytest.raises(TypeError, match=r"does not support dtype torch\.float64"):
            _native.describe(torch.randn(2, 2, dtype=torch.float64))
        with pytest.raises(ValueError, match="rank 7 exceed"):
            _native.describe(torch.randn(*([1] * 7)))


def test_the_cache_starts_over_instead_of_growing(monkeypatch):
    monkeypatch.setattr(_native, "_MAX_CACHED_TAILS", 8)
    monkeypatch.setattr(_native, "_tails", {})
    for n in range(1, 30):
        assert_describes(torch.empty(n, 3))
        assert len(_native._tails) <= 8


def test_the_library_reads_the_packed_bytes():
    """End to end: an op's C call reads shapes, strides and data through the packed descriptors
    (the SwiGLU op describes its strided gate, its up and its output)."""
    gate = torch.randn(3, 10)[:, ::2]  # strided input
    up = torch.randn(3, 5)
    out = activation.swiglu(gate, up, activation.SILU, 1.0, 0.0)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up)
