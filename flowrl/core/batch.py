"""``TensorBatch``: dataclasses of tensors that share their leading (batch) dims.

A policy's sample (actions, log-probs and whatever re-evaluation needs) is one; rollouts
stack them over time, join them over env shards and flatten them for minibatches without
knowing which policy family made them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import TypeVar

import torch
from torch import Tensor

B = TypeVar("B", bound="TensorBatch")


class TensorBatch:
    """Mixin for ``@dataclass`` classes whose every field is a tensor ``[*batch, ...]``."""

    def map(self: B, fn: Callable[[Tensor], Tensor]) -> B:
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)})  # type: ignore[arg-type]

    def __getitem__(self: B, index) -> B:
        return self.map(lambda t: t[index])

    def to(self: B, device: torch.device | str) -> B:
        return self.map(lambda t: t.to(device))

    def flatten(self: B, start: int = 0, end: int = 1) -> B:
        return self.map(lambda t: t.flatten(start, end))

    @classmethod
    def stack(cls: type[B], items: Sequence[B], dim: int = 0) -> B:
        return cls(**{f.name: torch.stack([getattr(i, f.name) for i in items], dim) for f in fields(cls)})  # type: ignore[arg-type]

    @classmethod
    def cat(cls: type[B], items: Sequence[B], dim: int = 0) -> B:
        return cls(**{f.name: torch.cat([getattr(i, f.name) for i in items], dim) for f in fields(cls)})  # type: ignore[arg-type]
