"""``lensray benchmark``: the papers' selection protocol on a curves table.

For each budget ratio r a method sees the columns D <= target // r (and D = 0), predicts the
loss of every model at D* = ``target``, and is scored against the table's true losses at D*
with :mod:`lensray.core.metrics`. Each method's ``predict`` call is timed (``fit_seconds``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lensray.core.curves import Curves, load_curves_csv
from lensray.errors import LensrayInputError
from lensray.core.metrics import evaluate

DEFAULT_RATIOS = (8, 16, 32, 64, 128, 256, 512)
DEFAULT_TARGET = 1_638_400
_PLOT_NAME = "benchmark.png"


def run_benchmark(
    curves: Curves,
    ratios: Sequence[int] = DEFAULT_RATIOS,
    methods: Sequence[Any] | None = None,
    target: int = DEFAULT_TARGET,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Score selection methods on ``curves`` at every budget ratio.

    Parameters
    ----------
    curves : Curves
        The full table; its column ``target`` is the ground truth.
    ratios : sequence of int
        Budget ratios r >= 2; a method sees D <= target // r.
    methods : sequence of (str or Selector), optional
        Selector names of ``lensray.core.selection`` or selector objects (``.name``, ``.predict``).
        Default: every registered selector.
    target : int
        D*, the sample size whose loss is predicted.
    progress : callable, optional
        Receives one line per (method, ratio) as it finishes.

    Returns
    -------
    list of dict
        One row per (method, ratio), method-major: ``method``, ``ratio``, ``max_samples``,
        ``pearson``, ``relacc``, ``spearman`` (x100), ``coverage90`` (0..1), ``top1``,
        ``regret``, ``n_failed``, ``selected`` (model id or None), ``failed`` (ids of the
        models the method could not score; the others are still ranked), ``fit_seconds``.
        Metrics that are undefined are NaN.

    Raises
    ------
    LensrayInputError
        Unknown method names, bad ratios, a target column that is absent or incomplete, a
        budget that leaves fewer than 3 points.
    """
    truth = _ground_truth(curves, target)
    budgets = _budgets(curves, ratios, target)
    selectors = _resolve(methods)
    rows = []
    for selector in selectors:
        for ratio, visible in budgets:
            start = time.perf_counter()
            prediction = selector.predict(visible, target)
            seconds = time.perf_counter() - start
            if list(prediction.ids) != curves.ids:
                raise RuntimeError(f"selector '{selector.name}' returned rows in a different order than its input")
            m = evaluate(prediction, truth)
            sel = m["selected"]
            rows.append(
                {
                    "method": selector.name,
                    "ratio": ratio,
                    "max_samples": target // ratio,
                    **{k: m[k] for k in ("pearson", "relacc", "spearman", "coverage90", "top1", "regret", "n_failed")},
                    "selected": None if sel is None else curves.ids[sel],
                    "failed": [curves.ids[i] for i in m["failed"]],
                    "fit_seconds": seconds,
                }
            )
            if progress is not None:
                progress(
                    f"{selector.name:>10} r={ratio:<4} PearCorr {m['pearson']:6.1f}  RelAcc {m['relacc']:6.1f}  "
                    f"failed {m['n_failed']}  {seconds:.3f} s"
                )
    return rows


def cli_main(args: argparse.Namespace) -> int:
    """Run ``lensray benchmark`` from parsed arguments; returns the exit code."""
    ratios = parse_int_list(args.ratios, "--ratios")
    methods = None if args.methods is None else parse_name_list(args.methods, "--methods")
    if args.target <= 0:
        raise LensrayInputError(f"--target must be a positive sample size, got {args.target}")
    curves = _scorable(load_curves_csv(args.curves, allow_missing=True), args.target)
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_writable(out)
    rows = run_benchmark(curves, ratios, methods, args.target, progress=_stderr)
    result = {"dataset": curves.name, "target": args.target, "rows": [_jsonable(r) for r in rows]}
    text = render_markdown(result)
    if out is not None:
        (out / "benchmark.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        (out / "benchmark.md").write_text(text)
        plot(result, out / _PLOT_NAME)
        _stderr(f"wrote {out / 'benchmark.md'}, {out / 'benchmark.json'}, {out / _PLOT_NAME}")
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        sys.stdout.write(text)
    return 0


def parse_int_list(text: str, flag: str) -> list[int]:
    """Comma-separated positive integers, without repeats."""
    values = []
    for item in (t.strip() for t in text.split(",")):
        try:
            value = int(item)
        except ValueError:
            raise LensrayInputError(f"{flag}: {item!r} is not an integer") from None
        if value in values:
            raise LensrayInputError(f"{flag}: {value} appears twice")
        values.append(value)
    return values


def parse_name_list(text: str, flag: str) -> list[str]:
    """Comma-separated non-empty names, without repeats."""
    names = [t.strip() for t in text.split(",")]
    if "" in names:
        raise LensrayInputError(f"{flag}: empty name in {text!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LensrayInputError(f"{flag}: {', '.join(dupes)} given twice")
    return names


def render_markdown(result: dict[str, Any]) -> str:
    """Markdown report: PearCorr and RelAcc tables (methods x ratios) and a per-method summary."""
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ratios = list(dict.fromkeys(r["ratio"] for r in rows))
    cell = {(r["method"], r["ratio"]): r for r in rows}
    lines = [f"# Selection benchmark: {result['dataset']} (D* = {result['target']:,})", ""]
    for key, title in (("pearson", "PearCorr (x100)"), ("relacc", "RelAcc (x100)")):
        lines += [f"## {title}", "", "| method | " + " | ".join(f"1/{r}" for r in ratios) + " | mean |"]
        lines.append("|---" * (len(ratios) + 2) + "|")
        for m in methods:
            vals = [cell[m, r][key] for r in ratios]
            lines.append(f"| {m} | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(_mean(vals))} |")
        lines.append("")
    lines += [
        "## Per method (mean over ratios)",
        "",
        "| method | Spearman | top-1 hits | mean regret | coverage90 | failed fits | fit seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        mine = [cell[m, r] for r in ratios]
        cov = _mean([r["coverage90"] for r in mine])
        lines.append(
            f"| {m} | {_fmt(_mean([r['spearman'] for r in mine]))} | {sum(bool(r['top1']) for r in mine)}/{len(mine)} "
            f"| {_fmt(_mean([r['regret'] for r in mine]), 4)} | {'-' if cov is None else _fmt(100 * cov) + ' %'} "
            f"| {sum(r['n_failed'] for r in mine)} | {sum(r['fit_seconds'] for r in mine):.3f} |"
        )
    lines.append("")
    failed = [f"- {r['method']} at 1/{r['ratio']}: {', '.join(r['failed'])}" for r in rows if r.get("failed")]
    if failed:
        lines += ["## Candidates not scored (excluded from the correlations, never selected)", "", *failed, ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """PearCorr and RelAcc vs budget ratio (log2 axis), one line per method, saved as PNG: lensray's in
    colour, the others in greys with their own markers and dashes, nudged apart where they coincide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ratios = sorted({r["ratio"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^v<>ph*"
    others = [m for m in methods if m != "lensray"]
    for ax, key, label in zip(axes, ("pearson", "relacc"), ("PearCorr (x100)", "RelAcc (x100)")):
        for m in methods:
            pts = sorted((r["ratio"], r[key]) for r in rows if r["method"] == m and r[key] is not None)
            if not pts:
                continue
            if m == "lensray":  # lensray's own line: bold, in colour, on top
                ax.plot(*zip(*pts), marker="o", color="crimson", lw=2.4, ms=6, label=m, zorder=5)
                continue
            k = others.index(m)
            # the others in greys, each with its own marker and dash and a slight horizontal offset, so that
            # methods whose figures coincide (often: rectified and lensllm with F free) stay visible
            shift = 2 ** (0.04 * (k - (len(others) - 1) / 2))
            xs, ys = zip(*pts)
            ax.plot([x * shift for x in xs], ys, marker=markers[k % len(markers)], ms=5, lw=1.0,
                    ls=("-", "--", "-.", ":")[k % 4], color=str(0.15 + 0.55 * k / max(1, len(others) - 1)),
                    label=m, zorder=3, alpha=0.9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ratios, [f"1/{r}" for r in ratios])
        ax.set_xlabel("data budget D_max / D*")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['dataset']}: selection at D* = {result['target']:,}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ground_truth(curves: Curves, target: int) -> np.ndarray:
    if len(curves) < 2:
        raise LensrayInputError(f"the benchmark needs at least 2 models, the curves table has {len(curves)}")
    truth = _truth(curves, target)
    bad = np.flatnonzero(~np.isfinite(truth))
    if bad.size:
        raise LensrayInputError(f"row '{curves.ids[bad[0]]}': no loss at the target D*={target}, the ground truth")
    return truth


def _truth(curves: Curves, target: int) -> np.ndarray:
    """The column ``target`` (NaN where missing); an error naming ``--target`` when there is none."""
    try:
        return curves.loss_at(target)
    except LensrayInputError as exc:
        raise LensrayInputError(f"--target {target}: {exc}") from None


def _scorable(curves: Curves, target: int) -> Curves:
    """The rows that have a true loss at ``target`` (the others cannot be scored: warned and left
    out); missing losses below it stay NaN ("not measured") and are warned about."""
    truth = _truth(curves, target)
    keep = np.flatnonzero(np.isfinite(truth))
    if keep.size < len(curves):
        gone = [curves.ids[i] for i in np.flatnonzero(~np.isfinite(truth))]
        if keep.size < 2:
            raise LensrayInputError(f"the benchmark needs at least 2 models with a loss at D*={target}, the curves "
                                    f"table has {keep.size} (row '{gone[0]}' has none)")
        _stderr(f"warning: no loss at D*={target} for {len(gone)} row(s) ({', '.join(gone[:3])}"
                f"{' ...' if len(gone) > 3 else ''}): left out of the benchmark")
        curves = curves.take(keep)
    holes = int(np.count_nonzero(~np.isfinite(curves.L[:, curves.D < target])))
    if holes:
        _stderr(f"warning: {holes} loss(es) missing below D*: methods fit those rows on the points they have")
    return curves


def _budgets(curves: Curves, ratios: Sequence[int], target: int) -> list[tuple[int, Curves]]:
    if not ratios:
        raise LensrayInputError("--ratios: give at least one budget ratio")
    bad = [r for r in ratios if not isinstance(r, (int, np.integer)) or r < 2]
    if bad:
        raise LensrayInputError(f"--ratios: {', '.join(map(str, bad))} invalid; a ratio must be an integer >= 2")
    out = []
    for r in ratios:
        try:
            out.append((int(r), curves.budget(target // r)))
        except LensrayInputError as exc:
            raise LensrayInputError(f"--ratios: ratio {r}: {exc}") from None
    return out


def _resolve(methods: Sequence[Any] | None) -> list[Any]:
    names = None if methods is None else [m for m in methods if isinstance(m, str)]
    available = _available() if names is None or names else {}
    if methods is None:
        return [factory() for factory in available.values()]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise LensrayInputError(
            f"--methods: unknown method(s) {', '.join(unknown)}; known: {', '.join(available)}"
        )
    return [available[m]() if isinstance(m, str) else m for m in methods]


def _available() -> dict[str, Callable[[], Any]]:
    """Registered selectors by name (a function so that tests can substitute a registry)."""
    from lensray.core.selection import SELECTORS, get_selector

    return {name: (lambda n=name: get_selector(n)) for name in SELECTORS}


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lensray-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise LensrayInputError(f"--out '{out}': cannot write there ({exc.strerror or exc})") from None


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """NaN -> None and numpy scalars -> Python, so the row is strict JSON."""
    out = {}
    for k, v in row.items():
        if isinstance(v, (np.floating, float)):
            v = None if math.isnan(v) else float(v)
        elif isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, np.bool_):
            v = bool(v)
        out[k] = v
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
