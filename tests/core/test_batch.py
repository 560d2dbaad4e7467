"""Tests of flowrl.core.batch.TensorBatch on a small dataclass.

Oracle: torch.stack / torch.cat / indexing / flatten applied to each field by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from flowrl.core.batch import TensorBatch


@dataclass
class Pair(TensorBatch):
    x: Tensor  # [*batch, 3]
    m: Tensor  # [*batch] bool


def _pair(seed: int, *batch: int) -> Pair:
    g = torch.Generator().manual_seed(seed)
    return Pair(x=torch.randn((*batch, 3), generator=g), m=torch.rand(batch, generator=g) > 0.5)


def _assert_fields(got: Pair, x: Tensor, m: Tensor) -> None:
    assert isinstance(got, Pair)
    assert torch.equal(got.x, x) and got.x.dtype == x.dtype
    assert torch.equal(got.m, m) and got.m.dtype == torch.bool


@pytest.mark.parametrize("dim", [0, 1])
def test_stack_equals_torch_stack_of_each_field(dim):
    items = [_pair(s, 4) for s in range(3)]
    got = Pair.stack(items, dim=dim)
    _assert_fields(got, torch.stack([i.x for i in items], dim), torch.stack([i.m for i in items], dim))
    assert got.x.shape == ((3, 4, 3) if dim == 0 else (4, 3, 3))


@pytest.mark.parametrize("dim", [0, 1])
def test_cat_equals_torch_cat_of_each_field(dim):
    # uneven sizes along the joined axis
    items = [_pair(0, 2, 3), _pair(1, 2, 1), _pair(2, 2, 4)] if dim == 1 else [_pair(0, 1, 2), _pair(1, 4, 2)]
    got = Pair.cat(items, dim=dim)
    _assert_fields(got, torch.cat([i.x for i in items], dim), torch.cat([i.m for i in items], dim))


def test_flatten_index_and_map():
    p = _pair(5, 3, 4)
    flat = p.flatten(0, 1)
    _assert_fields(flat, p.x.reshape(12, 3), p.m.reshape(12))
    # [T, N] flattening is time-major: row t * N + n is (t, n)
    assert torch.equal(flat.x[1 * 4 + 2], p.x[1, 2])

    idx = torch.tensor([7, 0, 7, 11])
    _assert_fields(flat[idx], flat.x[idx], flat.m[idx])
    _assert_fields(flat[2:5], flat.x[2:5], flat.m[2:5])
    _assert_fields(p[1], p.x[1], p.m[1])
    mask = flat.m
    _assert_fields(flat[mask], flat.x[mask], flat.m[mask])

    doubled = p.map(lambda t: t.repeat_interleave(2, dim=0))
    _assert_fields(doubled, p.x.repeat_interleave(2, 0), p.m.repeat_interleave(2, 0))
    # map returns a new object: the original is untouched
    assert p.x.shape == (3, 4, 3)


def test_to_keeps_values_and_dtypes():
    p = _pair(3, 2)
    moved = p.to("cpu")
    _assert_fields(moved, p.x, p.m)
    if torch.cuda.is_available():
        on_gpu = p.to("cuda")
        assert on_gpu.x.is_cuda and on_gpu.m.is_cuda
        _assert_fields(on_gpu.to("cpu"), p.x, p.m)
