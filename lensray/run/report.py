"""Outputs of a screening run: ``selection.json``, ``report.md`` and ``curves.png``.

The driver hands over the final ranking (a :class:`~lensray.run.results.Selection`, whose
``to_dict`` is ``selection.json``), every probe result and, optionally, the fitted curve of
each candidate; this module only renders them, through the
:class:`~lensray.run.store.ProbeStore` (so every text is redacted and every write atomic).
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from lensray.run.results import STATUSES, RankingEntry, Selection
from lensray.run.store import ProbeStore, is_ok

TOP_COLOURED = 12
MAX_RANKED = 30  # rows of the ranking panel
MAX_COLOURED = 20  # larger zoos: the top TOP_COLOURED in colour, the others grey and thin
GREY = (0.6, 0.6, 0.6, 1.0)

Fitted = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def write_report(
    store: ProbeStore,
    selection: Selection | Mapping[str, Any],
    probes: Sequence[Mapping[str, Any]],
    target_samples: int,
    fitted: Fitted | None = None,
    title: str = "lensray screening",
) -> dict[str, str]:
    """Write ``selection.json``, ``report.md`` and ``curves.png`` into ``store``.

    Parameters
    ----------
    store
        Output store.
    selection
        The result, or its ``selection.json`` dict (read with :meth:`Selection.from_dict`, which
        raises ValueError naming a missing key).
    probes
        Probe records (``candidate``, ``n_samples``, ``test_loss``, ``status`` ...), e.g. ``store.get_all()``.
    target_samples
        D*, marked on the plot.
    fitted
        Optional ``{candidate: (D, loss)}``: the predictor's extrapolation from the largest observed D to
        D* (:func:`predictor_curves`); without it the display fit is extended instead.
    title
        First heading of the report.

    Returns
    -------
    dict
        ``{"selection.json": path, "report.md": path, "curves.png": path}``.
    """
    if not isinstance(selection, Selection):
        selection = Selection.from_dict(selection)
    return {
        "selection.json": store.write_json("selection.json", selection.to_dict()),
        "report.md": store.write_text("report.md", render_markdown(selection, probes, target_samples, title)),
        "curves.png": store.write_bytes("curves.png", plot_curves(selection, probes, target_samples, fitted)),
    }


# ---- markdown ----------------------------------------------------------------------------------


def _num(value: Any, fmt: str = ".4f") -> str:
    if value is None or isinstance(value, float) and not math.isfinite(value):
        return "–"
    return format(value, fmt)


def _flops(value: Any) -> str:
    return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):.3g}"


def _params(value: Mapping[str, float] | None) -> str:
    if not value:
        return "–"
    return ", ".join(f"{k}={_num(v, '.4g')}" for k, v in value.items())


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _seconds(value: Any) -> str:
    if value is None:
        return "–"
    value = float(value)
    return f"{value:.1f} s" if value < 120 else f"{value:.0f} s ({value / 3600:.2f} h)"


def render_markdown(
    selection: Selection, probes: Sequence[Mapping[str, Any]], target_samples: int, title: str
) -> str:
    """The text of ``report.md``."""
    ranking = selection.ranking
    compute = selection.compute
    by_cand = _losses(probes)
    lines = [f"# {_cell(title)}", ""]
    best = selection.entry(selection.selected) if selection.selected is not None else None
    if best is None:
        lines += ["**No candidate selected**: every candidate failed.", ""]
    else:
        lo, hi = best.interval
        lines += [
            f"**Selected: `{_cell(best.candidate)}`**, predicted test loss after fine-tuning on "
            f"D* = {target_samples:,} samples: {_num(best.predicted_loss)} "
            f"(interval {_num(lo)} – {_num(hi)}).",
            "",
        ]
    counts = {s: sum(r.status == s for r in ranking) for s in STATUSES}
    lines += [f"{len(ranking)} candidates: {counts['finished']} finished, {counts['pruned']} pruned, "
              f"{counts['failed']} failed.", ""]
    if selection.notes:
        lines += [f"Predictor `{_cell(selection.predictor)}`: " + "; ".join(_cell(n) for n in selection.notes) + ".", ""]

    lines += ["## Ranking", "",
              "| rank | candidate | status | predicted loss at D* | interval | probes | largest D | "
              "pruned at | fitted parameters | FLOPs |",
              "|---:|---|---|---:|---|---:|---:|---:|---|---:|"]
    for i, row in enumerate(ranking, 1):
        lo, hi = row.interval
        seen = by_cand.get(row.candidate, {})
        lines.append(
            f"| {i} | `{_cell(row.candidate)}` | {row.status} | {_num(row.predicted_loss)} | "
            f"{_num(lo)} – {_num(hi)} | {len(seen)} | {max(seen) if seen else '–'} | "
            f"{row.pruned_at if row.pruned_at is not None else '–'} | {_cell(_params(row.params))} | "
            f"{_flops(row.flops)} |"
        )
    lines.append("")

    saved = compute.saved_fraction
    lines += ["## Compute bill", "",
              "| | |", "|---|---:|",
              f"| FLOPs spent on probes | {_flops(compute.flops_spent)} |",
              f"| FLOPs of full fine-tuning of every candidate on D* | {_flops(compute.flops_full_tuning)} |",
              f"| saved | {'–' if saved is None else f'{100 * float(saved):.2f} %'} |",
              f"| GPU time | {_seconds(compute.gpu_seconds)} |",
              f"| wall time | {_seconds(compute.wall_seconds)} |"]
    if compute.resume_wall_seconds:
        each = ", ".join(_seconds(t) for t in compute.resume_wall_seconds)
        lines.append(f"| wall time of {len(compute.resume_wall_seconds)} later --resume run(s) | "
                     f"{_seconds(sum(compute.resume_wall_seconds))} ({each}) |")
    lines.append("")
    if compute.uncharged:
        names = ", ".join(f"`{_cell(c)}`" for c in compute.uncharged)
        lines += [f"Not in the bill (no parameter count known): {names}. Their probes are charged nothing and "
                  "they are left out of full tuning too, so the saved fraction is over the other candidates.", ""]

    pruned = [r for r in ranking if r.status == "pruned"]
    if pruned:
        lines += ["## Why candidates were stopped", ""]
        for row in pruned:
            reason = row.reason or row.error or "no reason recorded by the scheduler"
            lines.append(f"- `{_cell(row.candidate)}` stopped after D = {row.pruned_at}: {_cell(reason)}")
        lines.append("")
    ran = [r for r in ranking if r.status == "finished" and r.candidate != selection.selected]
    if ran:
        spent = float(compute.flops_spent or 0.0)
        lines += ["## Why the others ran to the end", ""]
        for row in sorted(ran, key=lambda r: -float(r.flops or 0.0)):
            share = f" ({100 * float(row.flops) / spent:.1f} % of the compute)" if spent > 0 and row.flops else ""
            lines.append(f"- `{_cell(row.candidate)}`{share}: {_cell(row.reason or 'no reason recorded')}")
        lines.append("")
    failed = [r for r in ranking if r.status == "failed"]
    if failed:
        lines += ["## Failed candidates", ""]
        for row in failed:
            lines.append(f"- `{_cell(row.candidate)}`: {_cell(row.error or 'unknown error')}")
        lines.append("")

    sizes = sorted({d for losses in by_cand.values() for d in losses})
    if sizes:
        lines += ["## Observed test loss", "", "| candidate | " + " | ".join(f"D={d}" for d in sizes) + " |",
                  "|---|" + "---:|" * len(sizes)]
        for row in ranking:
            seen = by_cand.get(row.candidate, {})
            lines.append(f"| `{_cell(row.candidate)}` | " + " | ".join(_num(seen.get(d)) for d in sizes) + " |")
        lines.append("")
    lines += ["![fitted curves](curves.png)", ""]
    return "\n".join(lines)


def _losses(probes: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, float]]:
    """candidate -> {n_samples: test_loss} of the successful probes."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for rec in probes:
        loss = rec.get("test_loss")
        if not is_ok(rec) or loss is None or not math.isfinite(float(loss)):
            continue
        out[str(rec["candidate"])][int(rec["n_samples"])] = float(loss)
    return dict(out)


# ---- plot --------------------------------------------------------------------------------------


def _display_fits(losses: dict[str, dict[int, float]], grid: np.ndarray) -> dict[str, np.ndarray]:
    """Rectified-law fits of each candidate's observed points (display only), on ``grid``."""
    from lensray.core.laws import RectifiedLaw

    ids = [c for c, seen in losses.items() if sum(d > 0 for d in seen) >= 3]
    if not ids:
        return {}
    D = np.array(sorted({d for c in ids for d in losses[c]}), dtype=float)
    L = np.array([[losses[c].get(int(d), np.nan) for d in D] for c in ids])
    try:
        pred = RectifiedLaw().fit(D, L).predict(grid)
    except (ValueError, ArithmeticError):  # a display fit must never lose the report of a finished run
        return {}
    return {c: pred[i] for i, c in enumerate(ids) if np.all(np.isfinite(pred[i]))}


LOG_SPAN = 4.0
"""Above this ratio of the largest to the smallest loss in view, the loss axis is logarithmic."""


def _y_range(ranking: Sequence[RankingEntry], losses: dict[str, dict[int, float]]) -> tuple[float, float, bool]:
    """Loss axis limits that keep every observed point (zero-shot ones included) and every prediction
    in view, and whether the axis is logarithmic (a zero-shot loss far above the fine-tuned ones)."""
    values = [v for seen in losses.values() for v in seen.values() if math.isfinite(v)]
    for row in ranking:
        values += [float(v) for v in [row.predicted_loss, *row.interval]
                   if v is not None and math.isfinite(float(v))]
    values = values or [0.0, 1.0]
    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo > LOG_SPAN:
        return lo / 1.1, hi * 1.25, True
    pad = 0.08 * (hi - lo) or 0.1 * abs(hi) or 0.1
    return lo - pad, hi + 2 * pad, False


def _colours(n: int) -> list:
    """One colour per candidate up to MAX_COLOURED; beyond that the top TOP_COLOURED keep theirs, the rest are grey."""
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= MAX_COLOURED:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["tab20"](i) for i in range(TOP_COLOURED)] + [GREY] * (n - TOP_COLOURED)


def plot_curves(
    selection: Selection,
    probes: Sequence[Mapping[str, Any]],
    target_samples: int,
    fitted: Fitted | None = None,
) -> bytes:
    """PNG bytes: observed points, fitted curves and a D* marker, one colour per candidate; on the right,
    the ranking with each prediction at D* and its interval (:func:`_plot_ranking`).

    Within the observed range each candidate gets a rectified-law fit of its points; beyond it, the
    ``fitted`` extrapolation when given (see :func:`predictor_curves`), else the rectified fit.
    The x axis is logarithmic; the zero-shot point (D = 0) is drawn left of a separator at D = start/4.
    Every observed point stays in view: the loss axis turns logarithmic when the losses span more
    than :data:`LOG_SPAN` (a zero-shot loss far above the fine-tuned ones). A legend names the
    coloured candidates.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranking = selection.ranking
    losses = _losses(probes)
    positive = sorted(d for seen in losses.values() for d in seen if d > 0)
    start = positive[0] if positive else max(1, target_samples // 1000)
    x_zero = start / 4  # where D = 0 (zero-shot) is drawn on the log axis
    grid = np.geomspace(start / 2, target_samples, 200)
    display = _display_fits(losses, grid)
    fitted = fitted or {}

    y_lo, y_hi, log_y = _y_range(ranking, losses)
    fig, (ax, side) = plt.subplots(1, 2, figsize=(15, 6.5), dpi=110, gridspec_kw={"width_ratios": [2.7, 1]})
    colours = _colours(len(ranking))
    _plot_ranking(side, ranking, colours, selection.selected, target_samples)
    for i, (row, colour) in enumerate(zip(ranking, colours)):
        cand = row.candidate
        seen = losses.get(cand, {})
        background = colour == GREY
        alpha = 0.3 if background else 1.0 if row.status == "finished" else 0.55
        lw = 1.8 if cand == selection.selected else 0.6 if background else 1.0
        z = 1 if background else 3
        if seen:
            ds = sorted(seen)
            ax.plot([d if d > 0 else x_zero for d in ds], [seen[d] for d in ds], "o", color=colour, ms=4,
                    alpha=alpha, zorder=z, label=None if background else cand)
        d_max = max(seen, default=0)
        if cand in display and d_max > 0:
            inside = grid <= d_max
            ax.plot(grid[inside], display[cand][inside], "-", color=colour, lw=lw, alpha=alpha, zorder=z)
        if cand in fitted:
            xs, ys = (np.asarray(v, dtype=float) for v in fitted[cand])
            keep = (xs > 0) & np.isfinite(ys)
            ax.plot(xs[keep], ys[keep], "--", color=colour, lw=lw, alpha=alpha, zorder=z)
        elif cand in display and d_max > 0:
            beyond = grid >= d_max
            ax.plot(grid[beyond], display[cand][beyond], ":", color=colour, lw=0.8, alpha=alpha, zorder=z)
        pred = row.predicted_loss
        if row.has_prediction and not background:
            x = target_samples * (1 + 0.04 * ((i % 7) - 3))  # spread overlapping markers a little
            ax.plot([x], [float(pred)], "s", color=colour, ms=5, alpha=alpha, zorder=4)
    if log_y:
        ax.set_yscale("log")
    ax.set_ylim(y_lo, y_hi)
    ax.set_xscale("log")
    if ax.get_legend_handles_labels()[0]:  # a run where no candidate has a probe has nothing to name
        ax.legend(loc="lower left", fontsize=7, ncol=2 if len(ranking) > 8 else 1, framealpha=0.8,
                  title="candidates (ranking order)", title_fontsize=7)
    ax.axvline(target_samples, color="black", ls="--", lw=0.8)
    ax.axvline(start / 2.8, color="grey", lw=0.6)
    ax.annotate(f"D* = {target_samples:,}  ", (target_samples * 1.08, 0.98), xycoords=("data", "axes fraction"),
                ha="left", va="top", fontsize=8, rotation=90)
    ticks = [x_zero] + [t for t in 10.0 ** np.arange(0, 12) if start / 2 <= t <= target_samples * 1.5]
    ax.set_xticks(ticks, ["0"] + [f"{t:,.0f}" for t in ticks[1:]])
    ax.set_xlabel("fine-tuning samples D (log scale; the leftmost point is the zero-shot loss, D = 0)\n"
                  "solid: rectified-law fit of the observed points; "
                  + ("dashed: the predictor's extrapolation" if fitted else "dotted: its extrapolation")
                  + "; squares: predicted loss at D* (intervals in the right panel)", fontsize=8)
    ax.set_ylabel("test loss" + (" (log scale)" if log_y else ""))
    selected = selection.selected
    ax.set_title(f"observed losses, fitted curves and predictions at D*; selected: {selected}" if selected
                 else "observed losses and fitted curves")
    ax.grid(True, which="major", alpha=0.25)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _plot_ranking(ax: Any, ranking: Sequence[RankingEntry], colours: list, selected: str | None,
                  target_samples: int) -> None:
    """The ranking panel: each candidate's predicted loss at D* and its interval, in ranking order
    (the first MAX_RANKED), coloured as in the curves panel; hollow markers for pruned candidates."""
    import matplotlib.ticker

    predicted = [(row, colour) for row, colour in zip(ranking, colours) if row.has_prediction]
    rows = predicted[:MAX_RANKED]
    if not rows:
        ax.text(0.5, 0.5, "no candidate has a prediction", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    for k, (row, colour) in enumerate(rows):
        pred = float(row.predicted_loss)
        lo, hi = row.interval
        if lo is not None and hi is not None and math.isfinite(float(lo)) and math.isfinite(float(hi)):
            ax.plot([float(lo), float(hi)], [k, k], "-", color=colour, lw=2.2 if row.candidate == selected else 1.2)
        finished = row.status == "finished"
        ax.plot([pred], [k], "s" if finished else "o", color=colour, ms=6, mfc=colour if finished else "white")
    if selected is not None:
        best = next((float(r.predicted_loss) for r, _ in rows if r.candidate == selected), None)
        if best is not None:
            ax.axvline(best, color="black", ls=":", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{r.candidate} ({r.status}"
                                     + (f" at {r.pruned_at:,}" if r.pruned_at is not None else "") + ")"
                                     for r, _ in rows], fontsize=7)
    ax.set_xscale("log")  # the intervals are multiplicative: symmetric about the prediction here
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.tick_params(axis="x", which="both", labelsize=7)
    ax.yaxis.tick_right()
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.grid(True, axis="x", alpha=0.25)
    more = len(predicted) - len(rows)
    ax.set_title(f"predicted loss at D* = {target_samples:,}, ranked" + (f" (first {len(rows)}; {more} more)"
                                                                          if more > 0 else ""), fontsize=9)
    ax.set_xlabel("test loss: square = finished, circle = pruned; line = interval", fontsize=8)
    for label, (row, colour) in zip(ax.get_yticklabels(), rows):  # last: the calls above remake the labels
        label.set_color(colour if colour != GREY else "dimgrey")
        if row.candidate == selected:
            label.set_fontweight("bold")


def predictor_curves(selector: Any, curves: Any, target: int, points: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The selector's own extrapolation, for the plot: predicted loss from each candidate's largest observed D to D*.

    Parameters
    ----------
    selector
        A :class:`lensray.core.selection.Selector` (the run's predictor).
    curves
        The :class:`lensray.core.curves.Curves` the ranking was made from (NaN = not probed).
    target
        D*; the last point of every curve is the selector's prediction at D*, as in the ranking.
    points
        Sizes on the log grid between the smallest largest-observed D and D*.

    Returns
    -------
    dict
        ``{candidate: (D, loss)}`` starting at the candidate's last observed point.
    """
    D = np.asarray(curves.D, dtype=float)
    L = np.asarray(curves.L, dtype=float)
    observed = np.isfinite(L) & (D > 0)[None, :]
    if not observed.any():
        return {}
    d_max = np.where(observed, D[None, :], 0.0).max(axis=1)
    sizes = np.unique(np.geomspace(d_max[d_max > 0].min(), target, points).round())
    sizes = sizes[sizes > d_max[d_max > 0].min()]
    predicted: dict[float, np.ndarray] = {}
    for d in sizes:
        try:
            predicted[float(d)] = np.asarray(selector.predict(curves, int(d)).loss, dtype=float)
        except (ValueError, ArithmeticError):  # a size the selector cannot predict at is left out of the plot
            continue
    out = {}
    for i, cid in enumerate(curves.ids):
        if d_max[i] <= 0:
            continue
        last = L[i, np.flatnonzero(observed[i])[-1]]
        xs = [d for d in predicted if d > d_max[i] and np.isfinite(predicted[d][i])]
        out[cid] = (np.array([d_max[i], *xs]), np.array([last, *(predicted[d][i] for d in xs)]))
    return out
