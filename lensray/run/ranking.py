"""The final ranking and the compute bill: every stored curve fitted, candidates ranked, FLOPs counted."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from lensray.core.curves import Curves
from lensray.core.forecast import Forecast, confidently_better, difference_interval, forecasts_from
from lensray.core.selection import Selector, get_selector
from lensray.run.config import ScreenConfig
from lensray.run.store import ProbeStore, make_plan, probe_grid, read_decision, replay_gaps


def curves_from_store(ids: list[str], grid: list[int], records: list[dict], sizes: Mapping[str, float],
                      families: Mapping[str, Optional[str]]) -> Curves:
    """A :class:`Curves` of every candidate's stored ``ok`` probes (NaN where not probed)."""
    col = {d: j for j, d in enumerate(grid)}
    L = np.full((len(ids), len(grid)), np.nan)
    row = {cid: i for i, cid in enumerate(ids)}
    for r in records:
        if r.get("status", "ok") == "ok" and r["candidate"] in row and r["n_samples"] in col and r.get("test_loss"):
            L[row[r["candidate"]], col[r["n_samples"]]] = float(r["test_loss"])
    size = np.array([sizes.get(c) or np.nan for c in ids], dtype=float)
    return Curves(ids, np.array(grid, dtype=float), L, size, [families.get(c) for c in ids])


def candidate_info(config: ScreenConfig, replay: Optional[Curves]) -> dict[str, dict[str, Any]]:
    info = {}
    sizes = dict(zip(replay.ids, replay.size)) if replay is not None else {}
    for c in config.zoo:
        size = c.size if c.size is not None else sizes.get(c.id)
        info[c.id] = {**c.model_dump(), "model": c.source,
                      "size": None if size is None or not np.isfinite(size) else float(size)}
    return info


def tokens_per_sample(records: list[dict], default: float) -> float:
    tok = sum(float(r.get("tokens") or 0.0) for r in records if r.get("n_samples", 0) > 0)
    n = sum(int(r["n_samples"]) for r in records if r.get("n_samples", 0) > 0)
    return tok / n if tok > 0 and n > 0 else default


def full_tuning(config: ScreenConfig, info: Mapping[str, dict], records: list[dict]) -> float:
    """FLOPs of fine-tuning every candidate on D*: sum of 6 * size * tokens/sample * D*."""
    total = 0.0
    for cid, cand in info.items():
        mine = [r for r in records if r.get("candidate") == cid]
        size = cand.get("size") or next((r.get("n_params") for r in mine if r.get("n_params")), None)
        if size:
            total += 6.0 * float(size) * tokens_per_sample(mine, config.tokens_per_sample) * config.target_samples
    return total


def plan_bill(config: ScreenConfig, out: Optional[str] = None, replay: Optional[Curves] = None) -> dict[str, Any]:
    """What a run would do, before any Ray work and without writing anything.

    Per candidate: the probes already in the store (a resumed run), the probes still to run and
    their worst-case FLOPs (6 * size * tokens per sample * D summed over them: no candidate
    pruned), with tokens per sample measured by the stored probes, else ``tokens_per_sample``.
    A size not in the config (or the replayed table) is counted from the model's config
    (:func:`lensray.engine.models.parameter_counts`, no weights loaded); candidates whose config cannot
    be had are listed, not billed.

    Returns
    -------
    dict
        ``{"grid", "target", "candidates": [{"candidate", "size", "stored", "todo", "pruned",
        "flops_todo"}], "assumed_tokens_per_sample" (None for a replay, billed at it exactly),
        "flops_todo", "flops_stored", "flops_full_tuning", "unsized"}``.
    """
    store = ProbeStore(out or config.storage.path, check=False, set_aside=False)  # a plan writes nothing
    grid = probe_grid(config, replay)
    plans = make_plan(config, store, grid, replay_gaps(replay, grid))
    info = candidate_info(config, replay)
    if replay is None:
        from lensray.engine.models import parameter_counts

        unknown = [c for c in config.zoo if info[c.id]["size"] is None]
        for c, n in zip(unknown, parameter_counts([(c.source, c.trust_remote_code) for c in unknown])):
            info[c.id]["size"] = None if n is None else float(n)
    records = store.get_all()
    rows, unsized = [], []
    for p in plans:
        cid, size = p.candidate.id, info[p.candidate.id]["size"]
        mine = [r for r in records if r.get("candidate") == cid]
        todo = p.todo if p.needs_trial else []
        tokens = tokens_per_sample(mine, config.tokens_per_sample)
        rows.append({"candidate": cid, "size": size, "stored": sorted(p.done), "todo": todo,
                     "pruned": bool(p.decision), "flops_todo": 6.0 * size * tokens * sum(todo) if size else None})
        if not size:
            unsized.append(cid)
    return {
        "grid": grid, "target": config.target_samples, "candidates": rows,
        "assumed_tokens_per_sample": None if replay is not None else config.tokens_per_sample, "unsized": unsized,
        "flops_todo": sum(r["flops_todo"] or 0.0 for r in rows),
        "flops_stored": sum(float(r.get("flops") or 0.0) for r in records),
        "flops_full_tuning": full_tuning(config, info, records),
    }


def _explain_finishers(config: ScreenConfig, entries: list[dict], selected: Optional[str],
                       final: Mapping[str, Forecast]) -> None:
    """Set ``reason`` of each finished candidate other than ``selected``: why the pruning rule never
    stopped it, judged on the final curves (the margin to the selected candidate against the
    uncertainty of the difference at the predictor's level). ``final``: the forecasts of the final ranking."""
    others = [e for e in entries if e["status"] == "finished" and e["candidate"] != selected]
    if selected is None or not others:
        return
    if not config.pruning.enabled:
        for e in others:
            e["reason"] = "ran to the end: pruning is off"
        return
    level = f"{100 * config.predictor.level:g} %"
    best = final.get(selected)
    for e in others:
        own = final.get(e["candidate"])
        diff = difference_interval(best, own) if best is not None and own is not None else None
        if diff is not None:
            margin = f"log gap {diff[0]:.3g} against the {level} half-width {diff[1]:.3g} of the difference"
        elif best is not None and own is not None and math.isfinite(own.lo) and math.isfinite(best.hi):
            margin = f"optimistic end {own.lo:.4g} against the pessimistic end {best.hi:.4g} of {selected}"
        else:
            e["reason"] = "never confidently worse than another candidate: no interval to compare"
            continue
        if confidently_better(best, own) is None:
            e["reason"] = f"never confidently worse than {selected}, even with the final curves ({margin})"
        else:
            e["reason"] = (f"confidently worse than {selected} only with the final curves ({margin}), not after any "
                           "earlier probe; a last probe is never stopped (nothing to save)")


def rank(config: ScreenConfig, store: ProbeStore, grid: list[int], backend: str, replay: Optional[Curves],
         wall_seconds: float) -> tuple[dict[str, Any], Selector, Curves, list[dict]]:
    """Fit every stored curve, rank the candidates and bill the compute.

    Returns the ``selection.json`` content, the selector and curves it was fitted with (for the
    plot) and the stored probe records.
    """
    info = candidate_info(config, replay)
    records = store.get_all()
    ids = [c.id for c in config.zoo]
    sizes = {cid: info[cid]["size"] or next((r.get("n_params") for r in records
                                            if r["candidate"] == cid and r.get("n_params")), None) for cid in ids}
    curves = curves_from_store(ids, grid, records, sizes, {cid: info[cid]["family"] for cid in ids})
    gaps = replay_gaps(replay, grid)
    selector = get_selector(config.predictor.method, config.predictor.level)
    pred = selector.predict(curves, config.target_samples)
    entries = []
    for i, cid in enumerate(ids):
        mine = [r for r in records if r["candidate"] == cid]
        decision = read_decision(store, cid)
        observed = {int(r["n_samples"]) for r in mine if r.get("status", "ok") == "ok"}
        status, reason, pruned_at, error = "finished", None, None, None
        if decision and decision["status"] == "failed":
            status, error = "failed", str(decision.get("reason") or "failed")
        elif decision and decision["status"] == "pruned":
            status, reason, pruned_at = "pruned", str(decision.get("reason") or "pruned"), decision["n_samples"]
        elif not (expected := set(grid) - gaps.get(cid, set())) <= observed:
            status, error = "failed", f"incomplete: {len(observed)} of {len(expected)} probes stored"
        if status != "failed" and not pred.ok[i]:
            status, error = "failed", pred.errors[i] or "curve could not be fitted"
        params = None if pred.params is None else [float(v) for v in np.asarray(pred.params)[i].reshape(-1)]
        entries.append({
            "candidate": cid, "status": status,
            "predicted_loss": float(pred.loss[i]) if status != "failed" else None,
            "interval": [float(pred.lo[i]), float(pred.hi[i])] if status != "failed" else [None, None],
            "pruned_at": pruned_at, "params": params if status != "failed" else None,
            "flops": sum(float(r.get("flops") or 0.0) for r in mine), "error": error, "reason": reason,
            "n_probes": len(observed),
        })
    order = {"finished": 0, "pruned": 1, "failed": 2}
    entries.sort(key=lambda e: (order[e["status"]], e["predicted_loss"] if e["predicted_loss"] is not None
                                and math.isfinite(e["predicted_loss"]) else math.inf))
    spent = sum(e["flops"] for e in entries)
    full = full_tuning(config, info, records)
    gpu_seconds = sum(float(r.get("wall_seconds") or 0.0) * info[r["candidate"]]["gpus"] * info[r["candidate"]]["workers"]
                      for r in records if r["candidate"] in info)
    selected = next((e["candidate"] for e in entries if e["status"] != "failed"), None)
    _explain_finishers(config, entries, selected, forecasts_from(curves, pred, config.predictor.level, config.pruning.relative))
    compute = {"flops_spent": spent, "flops_full_tuning": full, "saved_fraction": 1.0 - spent / full if full > 0 else None,
               "gpu_seconds": gpu_seconds, "wall_seconds": wall_seconds}
    probed = {r["candidate"] for r in records}
    uncharged = [cid for cid in ids if not sizes[cid] and cid in probed]
    if uncharged:
        compute["uncharged"] = uncharged  # no parameter count: outside both sides of the bill
    selection = {
        "selected": selected,
        "ranking": entries,
        "compute": compute,
        "backend": backend, "target_samples": config.target_samples, "grid": grid,
        "predictor": config.predictor.method,
    }
    return selection, selector, curves, records
