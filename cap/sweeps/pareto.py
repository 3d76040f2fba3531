"""Pareto fronts and hypervolumes, every objective maximised.

Used to compare methods and sweeps by one number: the hypervolume of a front is the volume of the region
its points dominate above a reference point (by default the origin: accuracy 0, reduction 0).
"""

from __future__ import annotations

from collections.abc import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """a is at least as good as b everywhere and better somewhere."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def non_dominated(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point dominates (duplicates of a front point all stay)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def hypervolume_2d(points: Sequence[Point], reference: Point = (0.0, 0.0)) -> float:
    """Area dominated by `points` above `reference` (points not above it in both coordinates add nothing)."""
    rx, ry = reference
    area, best_y = 0.0, ry
    for x, y in sorted(((x, y) for x, y in points if x > rx and y > ry), key=lambda p: -p[0]):
        if y > best_y:
            area += (x - rx) * (y - best_y)
            best_y = y
    return area


def hypervolume_3d(points: Sequence[Point], reference: Point = (0.0, 0.0, 0.0)) -> float:
    """Volume dominated by `points` above `reference`: 2-D slices swept down the third coordinate."""
    rx, ry, rz = reference
    above = [(x, y, z) for x, y, z in points if x > rx and y > ry and z > rz]
    levels = sorted({z for _, _, z in above}, reverse=True) + [rz]
    volume = 0.0
    for top, below in zip(levels, levels[1:], strict=False):
        # between `below` and `top` the points with z >= top dominate the same 2-D area
        volume += hypervolume_2d([(x, y) for x, y, z in above if z >= top], (rx, ry)) * (top - below)
    return volume
