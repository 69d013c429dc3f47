"""The lensray predictor over a zoo that grows one probe at a time (numpy/scipy only).

:class:`LensrayZoo` gives the forecasts of :meth:`lensray.core.selection.LensraySelector.predict`
on the zoo's curves so far, without refitting what a new probe leaves unchanged. Every fit of a
curve's first ``p`` points (its line fits, :meth:`LensraySelector.line_stats`, and its rectified
law) depends on those points only, and probes are nested, so each (curve, p) is fitted once and
kept. The rectified law's start grid also depends on the sizes of the batch it is fitted in
(:meth:`lensray.core.laws.RectifiedLaw.fit`), so its fits are kept per set of sizes, the one of
the zoo's curves and the one of their backtest truncations; that set changes only when a probe
reaches a size no curve had. A forecast then fits only the new (curve, p) and evaluates the
zoo-shared parts (the steepening's ``rho`` and slope cap, the backtests, the pooled error
split) over all curves at once, with the selector's own arithmetic, so the results are those of
``predict`` on the same curves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from lensray.core.laws import RectifiedLaw
from lensray.core.selection import LEVEL, LensraySelector, _check_target

_CONTEXTS = 4
"""Sets of sizes whose rectified fits are kept (the zoo's and the backtests', with room to spare)."""


@dataclass
class ZooForecast:
    """Forecasts of ``n`` candidates at D* as arrays, in the zoo's row order.

    ``n_samples``: the largest probed size (D = 0 included); ``points``: probes with D > 0;
    ``loss``, ``lo``, ``hi``: the prediction and its interval at the selector's level;
    ``common``, ``own``: the standard deviations of the zoo-common and own parts of the error
    of log ``loss`` (``Prediction.error_split``).
    """

    ids: list[str]
    n_samples: np.ndarray
    points: np.ndarray
    loss: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    common: np.ndarray
    own: np.ndarray


class _RectCache:
    """Rectified fits of (slot, points) on one set of sizes: internal parameters and scale."""

    def __init__(self, sizes: np.ndarray, capacity: int, width: int) -> None:
        self.sizes = sizes
        self.theta = np.full((capacity, width, 4), np.nan)
        self.scale = np.full((capacity, width), np.nan)
        self.done = np.zeros((capacity, width), dtype=bool)

    def grow(self, capacity: int) -> None:
        extra = capacity - self.done.shape[0]
        self.theta = np.concatenate([self.theta, np.full((extra, *self.theta.shape[1:]), np.nan)])
        self.scale = np.concatenate([self.scale, np.full((extra, self.scale.shape[1]), np.nan)])
        self.done = np.concatenate([self.done, np.zeros((extra, self.done.shape[1]), dtype=bool)])


class LensrayZoo:
    """Incremental forecasts of :class:`~lensray.core.selection.LensraySelector` on a probe grid.

    Parameters
    ----------
    selector : LensraySelector
        The predictor (its ``k``, ``window``, ... and ``level``).
    grid : sequence of int
        The probe sizes, strictly increasing (D = 0: the zero-shot loss); other sizes are ignored.
    target : int
        D*, the size the forecasts are for.
    """

    def __init__(self, selector: LensraySelector, grid: Sequence[int], target: int) -> None:
        self.selector = selector
        self.D = np.asarray(grid, dtype=np.float64)
        self.target = target
        self._col = {int(d): j for j, d in enumerate(grid)}
        self._positive = np.flatnonzero(self.D > 0)
        zero = np.flatnonzero(self.D == 0)
        self._zero = int(zero[0]) if zero.size else None
        self._x_of = np.log2(self.D[self._positive])
        self._size_of = np.round(np.exp2(self._x_of))
        self._ids: list[str] = []
        self._slot: dict[str, int] = {}
        self._free: list[int] = []
        self._order: np.ndarray | None = None
        P = self._positive.size
        self._P = P
        self._cap = 0
        self._L = np.zeros((0, self.D.size))
        self._m = np.zeros(0, dtype=np.int64)
        self._x = np.zeros((0, P))
        self._y = np.zeros((0, P))
        self._pc = np.zeros((0, P), dtype=np.int64)  # each point's positive column
        self._y0 = np.zeros(0)
        self._stats = np.zeros((0, P + 1, 8))
        self._has_stats = np.zeros((0, P + 1), dtype=bool)
        self._rect: dict[tuple, _RectCache] = {}
        self._law = RectifiedLaw()

    # ------------------------------------------------------------------ state
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, candidate: str) -> bool:
        return candidate in self._slot

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._cap == len(self._slot):
            cap = max(16, 2 * self._cap)
            extra = cap - self._cap
            self._L = np.concatenate([self._L, np.full((extra, self.D.size), np.nan)])
            self._m = np.concatenate([self._m, np.zeros(extra, dtype=np.int64)])
            self._x = np.concatenate([self._x, np.full((extra, self._P), np.nan)])
            self._y = np.concatenate([self._y, np.full((extra, self._P), np.nan)])
            self._pc = np.concatenate([self._pc, np.zeros((extra, self._P), dtype=np.int64)])
            self._y0 = np.concatenate([self._y0, np.full(extra, np.nan)])
            self._stats = np.concatenate([self._stats, np.full((extra, self._P + 1, 8), np.nan)])
            self._has_stats = np.concatenate([self._has_stats, np.zeros((extra, self._P + 1), dtype=bool)])
            for cache in self._rect.values():
                cache.grow(cap)
            self._cap = cap
        return len(self._slot)

    def _clear(self, slot: int) -> None:
        self._L[slot] = np.nan
        self._m[slot] = 0
        self._x[slot] = self._y[slot] = np.nan
        self._y0[slot] = np.nan
        self._has_stats[slot] = False
        for cache in self._rect.values():
            cache.done[slot] = False

    def update(self, candidate: str, D: int, loss: float) -> None:
        """Record ``candidate``'s loss at size ``D`` (a new candidate joins the end of the row order)."""
        j = self._col.get(int(D))
        if j is None:
            return
        self.add(candidate)
        slot = self._slot[candidate]
        old = self._L[slot, j]
        loss = float(loss)
        if old == loss or (np.isnan(old) and np.isnan(loss)):
            return
        self._L[slot, j] = loss
        if j == self._zero:
            with np.errstate(divide="ignore", invalid="ignore"):
                self._y0[slot] = np.log(self._L[slot, j : j + 1])[0]
            for cache in self._rect.values():
                cache.done[slot] = False  # the rectified law fits the zero-shot loss too
            return
        row = self._L[slot, self._positive]
        keep = np.flatnonzero(np.isfinite(row))
        m = keep.size
        x, y = self._x_of[keep], np.log(row[keep])
        old_m = int(self._m[slot])
        same = 0  # leading points unchanged: their prefixes keep their fits
        while same < min(m, old_m) and self._x[slot, same] == x[same] and self._y[slot, same] == y[same]:
            same += 1
        self._x[slot] = self._y[slot] = np.nan
        self._x[slot, :m], self._y[slot, :m], self._pc[slot, :m] = x, y, keep
        self._m[slot] = m
        self._has_stats[slot, same + 1 :] = False
        for cache in self._rect.values():
            cache.done[slot, same + 1 :] = False

    def drop(self, candidate: str) -> None:
        """Forget ``candidate`` (a failed one is no rival)."""
        slot = self._slot.pop(candidate, None)
        if slot is None:
            return
        self._ids.remove(candidate)
        self._clear(slot)
        self._free.append(slot)
        self._order = None

    def add(self, candidate: str) -> None:
        """Give ``candidate`` its row, at the end of the row order, before it has a point."""
        if candidate not in self._slot:
            slot = self._new_slot()
            self._clear(slot)
            self._slot[candidate] = slot
            self._ids.append(candidate)
            self._order = None

    def sync(self, observed) -> None:
        """Make the state that of ``observed`` (id -> {D: loss}), its row order included."""
        for cid in [c for c in self._ids if c not in observed]:
            self.drop(cid)
        for cid, pts in observed.items():
            slot = self._slot.get(cid)
            if slot is not None and any(d not in pts for d in self._points(slot)):
                self.drop(cid)  # a point taken back: the candidate starts afresh
            self.add(cid)
            for d, loss in pts.items():
                self.update(cid, d, loss)
        if self._ids != list(observed):
            self._ids = list(observed)
            self._order = None

    def _points(self, slot: int) -> dict[int, float]:
        seen = np.flatnonzero(np.isfinite(self._L[slot]))
        return {int(self.D[j]): float(self._L[slot, j]) for j in seen}

    # ------------------------------------------------------------------ fits
    def _line_stats(self, slots: np.ndarray, points: np.ndarray) -> np.ndarray:
        """:meth:`LensraySelector.line_stats` of each (slot, points), fitted once and kept."""
        need = ~self._has_stats[slots, points]
        if need.any():
            s, p = slots[need], points[need]
            pairs = np.unique(np.stack([s, p], axis=1), axis=0)
            x = [self._x[a, :b] for a, b in pairs]
            y = [self._y[a, :b] for a, b in pairs]
            self._stats[pairs[:, 0], pairs[:, 1]] = self.selector.line_stats(x, y)
            self._has_stats[pairs[:, 0], pairs[:, 1]] = True
        return self._stats[slots, points]

    def _cache(self, sizes: np.ndarray) -> _RectCache:
        key = tuple(sizes.tolist())
        cache = self._rect.pop(key, None)
        if cache is None:
            cache = _RectCache(sizes, self._cap, self._P + 1)
            while len(self._rect) >= _CONTEXTS:
                self._rect.pop(next(iter(self._rect)))
        self._rect[key] = cache  # most recently used last
        return cache

    def _rectified(self, slots: np.ndarray, points: np.ndarray, xt: np.ndarray) -> np.ndarray:
        """:meth:`LensraySelector._rectified` of the batch of (slot, first points) at ``xt``."""
        out = np.full(slots.size, np.nan)
        if slots.size == 0:
            return out
        cols = self._pc[slots] if self._P else np.zeros((slots.size, 0), dtype=np.int64)
        upto = np.arange(self._P)[None, :] < points[:, None]
        sizes = np.unique(np.concatenate([self._size_of[np.unique(cols[upto])], np.zeros(1)]))
        enough = points + np.isfinite(np.exp(self._y0[slots])) >= 5
        if not enough.any():
            return out
        cache = self._cache(sizes)
        s, p = slots[enough], points[enough]
        new = ~cache.done[s, p]
        if new.any():
            pairs = np.unique(np.stack([s[new], p[new]], axis=1), axis=0)
            col = {d: j for j, d in enumerate(sizes)}
            L = np.full((len(pairs), sizes.size), np.nan)
            L[:, 0] = np.exp(self._y0[pairs[:, 0]])
            for r, (a, b) in enumerate(pairs):
                L[r, [col[d] for d in self._size_of[self._pc[a, :b]]]] = np.exp(self._y[a, :b])
            law = RectifiedLaw().fit(sizes, L)
            cache.theta[pairs[:, 0], pairs[:, 1]] = np.where(law.fitted_[:, None], law._theta, np.nan)
            cache.scale[pairs[:, 0], pairs[:, 1]] = law._scale
            cache.done[pairs[:, 0], pairs[:, 1]] = True
        theta, scale = cache.theta[s, p], cache.scale[s, p]
        grid = np.unique(np.exp2(xt[enough]))
        fitted = np.all(np.isfinite(theta), axis=1)
        y = np.full((s.size, grid.size), np.nan)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if fitted.any():
                y[fitted] = self._law._model(theta[fitted], grid, None)[0]
            pred = np.exp(y + np.log(scale)[:, None])
            out[enough] = np.log(pred[np.arange(s.size), np.searchsorted(grid, np.exp2(xt[enough]))])
        return out

    # ------------------------------------------------------------------ forecasts
    def _truncations(self, m: np.ndarray) -> tuple[list[np.ndarray], list[tuple[int, np.ndarray]]]:
        """The backtests' kept rows (``b = 1, 2, ...``) and the origins' ``(p, longer rows)`` of
        :meth:`LensraySelector._backtests` and :meth:`LensraySelector._widen_by_origin`."""
        k = self.selector.k
        backtests = []
        for b in range(1, int(m.max(initial=0)) - k + 1):
            keep = np.flatnonzero(m - b >= k)
            if keep.size < 2:
                break
            backtests.append(keep)
        origins = []
        for p in np.unique(m[m >= k]):
            longer = np.flatnonzero(m > p)
            if longer.size >= 2:
                origins.append((int(p), longer))
        return backtests, origins

    def _hidden_errors(self, order: np.ndarray, rows: np.ndarray, points: np.ndarray, rect: np.ndarray):
        """:meth:`LensraySelector._hidden_errors` of ``rows`` (positions in ``order``) from ``points``."""
        slots = order[rows]
        last = self._m[slots] - 1
        x_last, y_last = self._x[slots, last], self._y[slots, last]
        x_from = self._x[slots, points - 1]
        members = self.selector._members_from(self._line_stats(slots, points), points, x_last - x_from, rect)
        pred = self.selector._combine(members)[0]
        return y_last - pred, float(np.mean(x_last - x_from))

    def forecast(self) -> ZooForecast:
        """Every candidate's forecast at D*, as ``LensraySelector.predict`` on the curves so far."""
        sel = self.selector
        xt = np.log2(_check_target(_Grid(self.D), self.target))
        if self._order is None:
            self._order = np.array([self._slot[c] for c in self._ids], dtype=np.int64)
        order = self._order
        seen = np.isfinite(self._L[order])
        has = seen.any(axis=1)
        if not has.all():  # rows without a point take no part in the fits
            order = order[has]
            seen = seen[has]
        ids = [c for c, h in zip(self._ids, has) if h]
        n = order.size
        m = self._m[order]
        fitted = m >= sel.k
        x_last = np.where(m > 0, self._x[order, np.maximum(m - 1, 0)], np.nan)
        H = xt - x_last
        members = np.full((n, 4), np.nan)
        if fitted.any():
            rect = self._rectified(order, m, np.full(n, xt))
            members = sel._members_from(self._line_stats(order, m), m, H, rect)
        logL, spread = sel._combine(members)
        backtests, origins = self._truncations(m)
        jobs_rows = [keep for keep in backtests] + [longer for _, longer in origins]
        jobs_points = [m[keep] - b for b, keep in enumerate(backtests, start=1)] + \
            [np.full(longer.size, p) for p, longer in origins]
        rect_all = np.zeros(0)
        if jobs_rows:
            rows = np.concatenate(jobs_rows)
            points = np.concatenate(jobs_points)
            pairs = np.unique(np.stack([rows, points], axis=1), axis=0)  # the memo of _rectified_memo
            got = self._rectified(order[pairs[:, 0]], pairs[:, 1], x_last[pairs[:, 0]])
            table = np.full((n, self._P + 1), np.nan)
            table[pairs[:, 0], pairs[:, 1]] = got
            rect_all = table
        results = []
        for keep, points in zip(backtests, jobs_points):
            err, horizon = self._hidden_errors(order, keep, points, rect_all[keep, points])
            if np.isfinite(err).any():
                results.append((err, horizon))
        common, own = sel._pool(results, H)
        half = stats.norm.ppf(0.5 + LEVEL / 2) * np.sqrt(common**2 + own**2 + spread**2)
        widened = []
        for p, longer in origins:
            points = np.full(longer.size, p)
            widened.append((p, *self._hidden_errors(order, longer, points, rect_all[longer, points])))
        common_w, own_w = sel._widen(widened, m, H, common, own)
        loss, lo, hi = np.exp(logL), np.exp(logL - half), np.exp(logL + half)
        scale = float(stats.norm.ppf(0.5 + sel.level / 2) / stats.norm.ppf(0.5 + LEVEL / 2))
        if scale != 1.0:  # as Selector.predict
            with np.errstate(divide="ignore", invalid="ignore"):
                log_loss = np.log(loss)
                lo = np.exp(log_loss - scale * (log_loss - np.log(lo)))
                hi = np.exp(log_loss + scale * (np.log(hi) - log_loss))
        n_samples = np.where(seen, self.D[None, :], -np.inf).max(axis=1) if n else np.zeros(0)
        return ZooForecast(ids, n_samples.astype(np.int64), m.copy(), loss, lo, hi, common_w, np.hypot(own_w, spread))


class _Grid:
    """The one attribute of a Curves that :func:`lensray.core.selection._check_target` reads."""

    def __init__(self, D: np.ndarray) -> None:
        self.D = D
