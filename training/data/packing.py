"""Packing examples into rows: best-fit decreasing over a window of the global order, the rows of each window in
a keyed random order. Rows depend on the seed, the global order and the example lengths alone."""

from __future__ import annotations

import bisect
import functools

import numpy as np

from .order import KeyedPermutation


def best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Indices of `lengths` packed into bins of `capacity`, best-fit decreasing: longest first, each into the
    fullest bin it fits (ties: the earlier bin, then the earlier item), so the result depends on the lengths alone."""
    room: list[tuple[int, int]] = []  # (space left, bin), sorted
    bins: list[list[int]] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable").tolist():
        at = bisect.bisect_left(room, (int(lengths[i]), -1))
        if at < len(room):
            left, b = room.pop(at)
        else:
            left, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if left - int(lengths[i]) > 0:
            bisect.insort(room, (left - int(lengths[i]), b))
    return bins


def pack(picks: list[tuple[int, int]], lengths: list[np.ndarray], capacity: int) -> list[list[tuple[int, int]]]:
    """(source, example) picks packed into rows of `capacity` positions by best_fit."""
    sizes = np.array([lengths[s][j] for s, j in picks], dtype=np.int64)
    return [[picks[i] for i in row] for row in best_fit(sizes, capacity)]


class PackingPlan:
    """Rows of `capacity` positions from the global order: the examples at positions [w * window, (w+1) * window)
    are packed by best_fit, the rows of the window put in a keyed random order (best fit makes them longest
    first, and a step would otherwise see only long or only short examples), and row r of the run is the r-th row
    of that sequence, window after window. Rows depend on the seed, the global order and the example lengths
    alone, so step t reads the same rows on any number of processes and any accumulation, and a resume (a row
    count) continues exactly."""

    def __init__(self, picks, lengths: list[np.ndarray], capacity: int, window: int, seed: int):
        self.picks, self.lengths, self.capacity, self.window, self.seed = picks, lengths, capacity, window, seed
        self.first_window, self.row_ends = 0, [0]  # rows before windows first_window, first_window + 1, ...
        self._windows = functools.lru_cache(maxsize=8)(self._pack)

    def _pack(self, w: int) -> list[list[tuple[int, int]]]:
        rows = pack(self.picks(np.arange(w * self.window, (w + 1) * self.window)), self.lengths, self.capacity)
        order = KeyedPermutation(len(rows), (self.seed, 0x9ac, w))(np.arange(len(rows)))
        return [rows[k] for k in order.tolist()]

    def rows(self, indices: np.ndarray) -> list[list[tuple[int, int]]]:
        """The (source, example) picks of rows `indices` (from the cursor on, see start_at)."""
        out = []
        for r in np.asarray(indices).tolist():
            if r < self.row_ends[0]:
                raise ValueError(f"row {r} lies before the packing cursor (row {self.row_ends[0]})")
            while self.row_ends[-1] <= r:  # a fresh plan packs every window up to r once
                w = self.first_window + len(self.row_ends) - 1
                self.row_ends.append(self.row_ends[-1] + len(self._windows(w)))
            k = bisect.bisect_right(self.row_ends, r) - 1
            out.append(self._windows(self.first_window + k)[r - self.row_ends[k]])
        return out

    def cursor(self, row: int) -> list[int]:
        """[window, its first row] of the window holding `row`: where a resumed run's plan can start."""
        self.rows([row])
        k = bisect.bisect_right(self.row_ends, row) - 1
        return [self.first_window + k, self.row_ends[k]]

    def start_at(self, cursor: list[int]) -> None:
        """Continue from a saved cursor instead of packing every earlier window again."""
        self.first_window, self.row_ends = cursor[0], [cursor[1]]
        self._windows.cache_clear()

    def stats(self, windows: int = 4) -> tuple[float, float]:
        """Over the first `windows` windows: examples per row, and the share of the rows' positions they fill."""
        rows = [row for w in range(windows) for row in self._windows(w)]
        filled = sum(int(self.lengths[s][j]) for row in rows for s, j in row)
        return sum(len(row) for row in rows) / len(rows), filled / (len(rows) * self.capacity)
