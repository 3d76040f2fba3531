"""Pareto fronts and 2-D/3-D hypervolumes against brute force on random points, ties and duplicates included."""

from __future__ import annotations

import itertools
import random

import pytest

from cap.sweeps.pareto import dominates, hypervolume_2d, hypervolume_3d, non_dominated


def brute_front(points):
    return [i for i, p in enumerate(points)
            if not any(all(q[k] >= p[k] for k in range(len(p))) and q != p for q in points)]


@pytest.mark.parametrize("seed", range(30))
def test_front_matches_brute_force(seed):
    rng = random.Random(seed)
    dims = rng.choice([2, 3])
    points = [tuple(rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(dims)) for _ in range(rng.randint(1, 12))]
    points += [points[0]] * rng.randint(0, 2)  # duplicates stay together on (or off) the front
    assert non_dominated(points) == brute_front(points)


@pytest.mark.parametrize("seed", range(20))
def test_hypervolume_matches_grid_count(seed):
    rng = random.Random(seed)
    points = [(rng.choice([0.25, 0.5, rng.random()]), rng.random()) for _ in range(rng.randint(1, 7))]
    points.append(points[-1])
    n = 200
    inside = sum(any(px >= (i + 0.5) / n and py >= (j + 0.5) / n for px, py in points)
                 for i in range(n) for j in range(n))
    assert abs(inside / n**2 - hypervolume_2d(points)) < 2.5 / n


def test_hypervolume_edge_cases():
    assert hypervolume_2d([]) == 0.0
    assert hypervolume_2d([(0.5, 0.5)]) == 0.25
    assert hypervolume_2d([(0.5, 0.5), (0.4, 0.4)]) == 0.25  # a dominated point adds nothing
    assert hypervolume_2d([(0.5, 0.9)], reference=(0.2, 0.5)) == pytest.approx(0.3 * 0.4)
    assert hypervolume_2d([(0.1, 0.9)], reference=(0.2, 0.5)) == 0.0
    assert dominates((1, 1), (1, 0)) and not dominates((1, 1), (1, 1))


def exact_cell_volume(points, reference):
    """Brute force: cut space at every coordinate; a cell counts if one point dominates its upper corner."""
    cuts = [sorted({r, *(p[k] for p in points if p[k] > r)}) for k, r in enumerate(reference)]
    volume = 0.0
    for cell in itertools.product(*(range(len(c) - 1) for c in cuts)):
        upper = [cuts[k][i + 1] for k, i in enumerate(cell)]
        if any(all(p[k] >= upper[k] for k in range(len(p))) for p in points):
            size = 1.0
            for k, i in enumerate(cell):
                size *= cuts[k][i + 1] - cuts[k][i]
            volume += size
    return volume


@pytest.mark.parametrize("seed", range(40))
def test_hypervolume_exact_against_cells(seed):
    rng = random.Random(seed)
    dims = 2 + seed % 2
    points = [tuple(rng.choice([0.0, 0.25, 0.5, rng.random(), rng.uniform(-0.2, 0)]) for _ in range(dims))
              for _ in range(rng.randint(0, 9))]
    points += points[:rng.randint(0, 2)]  # duplicates
    reference = tuple(rng.choice([0.0, 0.1]) for _ in range(dims))
    hv = hypervolume_2d if dims == 2 else hypervolume_3d
    assert hv(points, reference) == pytest.approx(exact_cell_volume(points, reference), abs=1e-12)
    # only the front matters: dominated points change nothing
    front = [points[i] for i in non_dominated(points)]
    assert hv(front, reference) == pytest.approx(hv(points, reference), abs=1e-12)


def test_hypervolume_3d_known_values():
    assert hypervolume_3d([]) == 0.0
    assert hypervolume_3d([(0.5, 0.5, 0.5)]) == pytest.approx(0.125)
    # two boxes overlapping in a 0.5 x 0.5 x 0.5 cube
    assert hypervolume_3d([(1.0, 0.5, 0.5), (0.5, 1.0, 1.0)]) == pytest.approx(0.25 + 0.5 - 0.125)
