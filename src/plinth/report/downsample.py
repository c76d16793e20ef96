"""Down-sampling of long series for charts, without losing spikes or non-finite points.

The x range is cut into equal-count buckets; each bucket keeps, for every series, the point
with its smallest and its largest finite value (so a one-step spike survives at any zoom
level), and the first and last points of the whole series are kept. On top of that every
non-finite point (NaN, +-Inf) and every point whose x is in `keep_x` (event steps) is kept;
non-finite points beyond `max_nonfinite` (a run that stayed NaN for a long time) are thinned to
the first one per bucket, so the page stays small.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

MAX_POINTS = 2000


def downsample(
    x: Sequence[float],
    ys: Sequence[Sequence[float]],
    max_points: int = MAX_POINTS,
    keep_x: Iterable[float] = (),
    max_nonfinite: int = 5000,
) -> list[int]:
    """Sorted indices of the points to keep (all of them when there are few enough)."""
    n = len(x)
    if n <= max_points:
        return list(range(n))
    xs = np.asarray(x, dtype=float)
    per_bucket = 2 * max(1, len(ys))
    buckets = max(1, max_points // per_bucket)
    edges = np.unique(np.linspace(0, n, buckets + 1).astype(int))
    keep: set[int] = {0, n - 1}
    for y in ys:
        arr = np.asarray(y, dtype=float)
        fin = np.isfinite(arr)
        low = np.where(fin, arr, np.inf)
        high = np.where(fin, arr, -np.inf)
        for a, b in itertools.pairwise(edges):
            if not fin[a:b].any():
                continue
            keep.add(a + int(np.argmin(low[a:b])))
            keep.add(a + int(np.argmax(high[a:b])))
        bad = np.flatnonzero(~fin)
        if len(bad) > max_nonfinite:  # thin: the first non-finite point of each bucket
            bucket_of = np.searchsorted(edges, bad, side="right")
            _, first = np.unique(bucket_of, return_index=True)
            bad = bad[first]
        keep.update(int(i) for i in bad)
    wanted = np.asarray(list(keep_x), dtype=float)
    if wanted.size:
        keep.update(int(i) for i in np.flatnonzero(np.isin(xs, wanted)))
    return sorted(keep)
