"""The range map a sparse cache file is described by, against a byte-by-byte model."""

from __future__ import annotations

import random

from clearmlfs.ranges import Ranges


def test_ranges_agree_with_a_map_of_every_byte() -> None:
    rng = random.Random(3)
    ranges, model = Ranges(), bytearray(200)
    for _ in range(2000):
        start = rng.randrange(200)
        end = rng.randrange(start, 201)
        if rng.random() < 0.7:
            ranges.add(start, end)
            model[start:end] = b"\1" * (end - start)
        else:
            ranges.remove(start, end)
            model[start:end] = bytes(end - start)
        assert ranges.total == sum(model)
        spans = list(ranges)
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))  # disjoint, merged, sorted
        start = rng.randrange(200)
        end = rng.randrange(start, 201)
        gaps = list(ranges.gaps(start, end))
        assert [i for g in gaps for i in range(*g)] == [i for i in range(start, end) if not model[i]]
        assert ranges.covers(start, end) == all(model[start:end])
