"""Torch modules for the norm-preserving activations lipsdp reads (`lipsdp.estimate` accepts models using them).

They are plain torch code: `torch.export` traces them into `aten.sort` (GroupSort) or elementwise
`maximum` / `minimum` of the two halves of a pair (MaxMin), which `lipsdp.io.torch_export` recognises,
as it does the same patterns written in any other module.
"""

from __future__ import annotations

import torch


class GroupSort(torch.nn.Module):
    """Sort the features (dim 1) in consecutive groups of `group_size`, ascending (Anil et al., 2019)."""

    def __init__(self, group_size: int = 2, descending: bool = False) -> None:
        super().__init__()
        if group_size < 2:
            raise ValueError(f"group_size must be at least 2, got {group_size}")
        self.group_size = int(group_size)
        self.descending = bool(descending)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n % self.group_size:
            raise ValueError(f"{n} features do not split into groups of {self.group_size}")
        groups = x.unflatten(1, (n // self.group_size, self.group_size))
        return torch.sort(groups, dim=2, descending=self.descending).values.flatten(1, 2)


class MaxMin(torch.nn.Module):
    """(a, b) -> (max(a, b), min(a, b)) on consecutive pairs of features (dim 1): GroupSort of 2, descending."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = x.unflatten(1, (x.shape[1] // 2, 2))
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        return torch.stack([torch.maximum(a, b), torch.minimum(a, b)], dim=2).flatten(1, 2)
