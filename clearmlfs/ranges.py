"""A set of byte ranges: which parts of an object a sparse cache file holds (or has asked for)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator


class Ranges:
    """Disjoint, sorted, half-open [start, end) ranges; adjacent ones are merged."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.total = 0  # bytes covered

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        # Every range touching [start, end) (overlapping or adjacent) merges into one.
        first = bisect.bisect_left(self._ends, start)
        last = bisect.bisect_right(self._starts, end)
        if first < last:
            start, end = min(start, self._starts[first]), max(end, self._ends[last - 1])
            self.total -= sum(e - s for s, e in zip(self._starts[first:last], self._ends[first:last], strict=True))
        self._starts[first:last], self._ends[first:last] = [start], [end]
        self.total += end - start

    def remove(self, start: int, end: int) -> None:
        if start >= end:
            return
        first = bisect.bisect_right(self._ends, start)
        last = bisect.bisect_left(self._starts, end)
        if first >= last:
            return
        kept_starts, kept_ends = [], []
        if self._starts[first] < start:
            kept_starts.append(self._starts[first])
            kept_ends.append(start)
        if self._ends[last - 1] > end:
            kept_starts.append(end)
            kept_ends.append(self._ends[last - 1])
        self.total -= sum(e - s for s, e in zip(self._starts[first:last], self._ends[first:last], strict=True))
        self.total += sum(e - s for s, e in zip(kept_starts, kept_ends, strict=True))
        self._starts[first:last], self._ends[first:last] = kept_starts, kept_ends

    def gaps(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The sub-ranges of [start, end) not covered, in order."""
        index = bisect.bisect_right(self._ends, start)
        position = start
        while position < end:
            if index >= len(self._starts) or self._starts[index] >= end:
                yield position, end
                return
            if self._starts[index] > position:
                yield position, self._starts[index]
            position = max(position, self._ends[index])
            index += 1

    def covers(self, start: int, end: int) -> bool:
        return next(self.gaps(start, end), None) is None

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends, strict=True)
