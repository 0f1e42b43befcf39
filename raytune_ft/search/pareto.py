"""Two objectives (say target gain and capability retention): the non-dominated front, its 2-D
hypervolume, and a plot of every trial with the front drawn."""

from __future__ import annotations


def _maximised(point: tuple[float, float], modes: list[str]) -> tuple[float, float]:
    return tuple(value if mode == "max" else -value for value, mode in zip(point, modes))


def pareto_front(points: list[tuple[float, float]], modes: list[str]) -> list[int]:
    """Indices of the points no other point dominates (at least as good in both, better in one)."""
    scored = [_maximised(point, modes) for point in points]
    return [
        i for i, a in enumerate(scored)
        if not any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in scored)
    ]


def hypervolume(front: list[tuple[float, float]], modes: list[str], reference: tuple[float, float]) -> float:
    """Area dominated by the front and bounded by ``reference`` (a point worse than every member
    worth counting in both objectives); larger is better, comparable across runs with one reference."""
    ref_x, ref_y = _maximised(reference, modes)
    area, covered_y = 0.0, ref_y
    for x, y in sorted((_maximised(point, modes) for point in front), reverse=True):
        if x > ref_x and y > covered_y:
            area += (x - ref_x) * (y - covered_y)
            covered_y = y
    return area


def default_reference(points: list[tuple[float, float]], modes: list[str]) -> tuple[float, float]:
    """0 for a maximised metric (accuracy, retention: 0 is the worst score), the worst observed
    value for a minimised one."""
    return tuple(0.0 if mode == "max" else max(point[i] for point in points) for i, mode in enumerate(modes))
