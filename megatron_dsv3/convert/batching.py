"""Cutting an ordered list into consecutive groups of at most a byte budget (shards, files, reads)."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


def split_by_bytes(items: list[T], nbytes: Callable[[T], int], limit: int) -> list[list[T]]:
    """``items`` in order, cut so that no group passes ``limit`` bytes (an item larger than the
    limit is a group of its own); at least one group, possibly empty."""
    groups: list[list[T]] = [[]]
    size = 0
    for item in items:
        n = nbytes(item)
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return groups
