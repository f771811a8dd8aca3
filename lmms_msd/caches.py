"""Keeping only the accepted path in the target's KV cache after a verification."""

from __future__ import annotations

from typing import Any

import torch


def keep_path(cache: Any, prefix_len: int, path: torch.Tensor) -> None:
    """Drop the tree from a transformers cache except the nodes on `path`.

    The cache holds [prefix | tree nodes]; afterwards it holds [prefix | path nodes] in path order.
    Example: prefix_len 5, tree of 4 nodes (slots 5..8), path [0, 2] -> keep slots 0..4, 5, 7.
    path: [a + 1] tree node indices, root first
    """
    assert path.dim() == 1, f"path must be [a + 1], got {tuple(path.shape)}"
    keep = prefix_len + path.to(torch.long)
    for layer in cache.layers:
        layer.keys = torch.cat([layer.keys[..., :prefix_len, :], layer.keys[..., keep, :]], dim=-2)
        layer.values = torch.cat([layer.values[..., :prefix_len, :], layer.values[..., keep, :]], dim=-2)
