"""The final ranking and the compute bill: every stored curve fitted, candidates ranked (:class:`~lensray.run.results.Selection`), FLOPs counted."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from lensray.core.curves import Curves
from lensray.core.forecast import Forecast, confidently_better, difference_interval, forecasts_from
from lensray.core.ntk_term import NTKTerms
from lensray.core.selection import Selector, get_selector
from lensray.errors import LensrayInputError
from lensray.run.config import ScreenConfig
from lensray.run.results import Compute, RankingEntry, Selection
from lensray.run.store import ProbeStore, candidate_size, is_ok, make_plan, probe_grid, read_decision, replay_gaps


def curves_from_store(ids: list[str], grid: list[int], records: list[dict], sizes: Mapping[str, float],
                      families: Mapping[str, Optional[str]]) -> Curves:
    """A :class:`Curves` of every candidate's stored ``ok`` probes (NaN where not probed), with
    their NTK features (:meth:`~lensray.core.ntk_term.NTKTerms.from_records`) when probes computed them."""
    col = {d: j for j, d in enumerate(grid)}
    L = np.full((len(ids), len(grid)), np.nan)
    row = {cid: i for i, cid in enumerate(ids)}
    ntk: list[dict[int, dict]] = [{} for _ in ids]
    for r in records:
        if is_ok(r) and r["candidate"] in row and r["n_samples"] in col and r.get("test_loss"):
            L[row[r["candidate"]], col[r["n_samples"]]] = float(r["test_loss"])
            if r.get("ntk"):
                ntk[row[r["candidate"]]][int(r["n_samples"])] = r["ntk"]
    size = np.array([sizes.get(c) or np.nan for c in ids], dtype=float)
    D = np.array(grid, dtype=float)
    return Curves(ids, D, L, size, [families.get(c) for c in ids], ntk=NTKTerms.from_records(D, ntk))


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


def flops_per_token(config: ScreenConfig, size: float, records: list[dict]) -> float:
    """FLOPs one training token costs a candidate: measured by its stored probes, else
    ``6 * size`` for a full fine-tune and ``4 * size`` with LoRA (no weight gradients of the frozen base)."""
    tok = sum(float(r.get("tokens") or 0.0) for r in records if r.get("n_samples", 0) > 0 and r.get("flops"))
    flops = sum(float(r.get("flops") or 0.0) for r in records if r.get("n_samples", 0) > 0 and r.get("tokens"))
    if tok > 0 and flops > 0:
        return flops / tok
    return (4.0 if config.probe.method == "lora" else 6.0) * float(size)


def full_tuning(config: ScreenConfig, info: Mapping[str, dict], records: list[dict],
                tokens: Optional[Mapping[str, float]] = None) -> float:
    """FLOPs of fine-tuning every candidate on D* the way it is probed (:func:`flops_per_token`),
    at the tokens per sample its stored probes measured, else ``tokens[id]``, else ``tokens_per_sample``."""
    total = 0.0
    for cid, cand in info.items():
        mine = [r for r in records if r.get("candidate") == cid]
        size = candidate_size(cid, cand.get("size"), mine)
        if size:
            default = (tokens or {}).get(cid, config.tokens_per_sample)
            total += flops_per_token(config, size, mine) * tokens_per_sample(mine, default) * config.target_samples
    return total


def task_tokens(config: ScreenConfig) -> tuple[dict[str, float], Optional[str]]:
    """Training tokens per sample of each candidate on the task, before any probe: a sample of the
    task's train rows tokenised with the candidate's tokenizer, times ``probe.epochs``.

    Returns the figures (candidates whose tokenizer cannot be had are absent) and, when the task
    itself cannot be read here, why.
    """
    from lensray.engine.data import load_task, mean_tokens
    from lensray.engine.models import tokenizer_of

    try:
        data = load_task(config.task)
    except LensrayInputError as exc:
        return {}, str(exc)
    per_source: dict[str, float] = {}
    out = {}
    for c in config.zoo:
        if c.source not in per_source:
            tok = tokenizer_of(c.source, c.trust_remote_code)
            per_source[c.source] = math.nan if tok is None else mean_tokens(data.train, tok, config.task.max_length)
        if math.isfinite(per_source[c.source]):
            out[c.id] = per_source[c.source] * config.probe.epochs
    return out, None


def plan_bill(config: ScreenConfig, out: Optional[str] = None, replay: Optional[Curves] = None) -> dict[str, Any]:
    """What a run would do, before any Ray work and without writing anything.

    Per candidate: the probes already in the store (a resumed run), the probes still to run and
    their worst-case FLOPs (:func:`flops_per_token` * tokens per sample * D summed over them: no candidate
    pruned), with tokens per sample measured by the stored probes, else on the task
    (:func:`task_tokens`, epochs counted), else ``tokens_per_sample``; a replay bills
    ``tokens_per_sample`` as it runs.
    A size not in the config, the replayed table or the stored probes is counted from the model's config
    (:func:`lensray.engine.models.parameter_counts`, no weights loaded); candidates whose config cannot
    be had are listed, not billed.

    Returns
    -------
    dict
        ``{"grid", "target", "candidates": [{"candidate", "size", "stored", "todo", "pruned",
        "flops_todo", "tokens_per_sample", "tokens_from"}], "flops_todo", "flops_stored",
        "flops_full_tuning", "unsized", "task_unread"}`` (``tokens_from``: "probes", "task" or
        "assumed"; ``task_unread``: why the task could not be tokenised here, or None).
    """
    store = ProbeStore(out or config.storage.path, check=False, set_aside=False)  # a plan writes nothing
    grid = probe_grid(config, replay)
    plans = make_plan(config, store, grid, replay_gaps(replay, grid))
    info = candidate_info(config, replay)
    records = store.get_all()
    for cid, i in info.items():
        i["size"] = candidate_size(cid, i["size"], records)
    if replay is None:
        from lensray.engine.models import parameter_counts

        unknown = [c for c in config.zoo if info[c.id]["size"] is None]
        for c, n in zip(unknown, parameter_counts([(c.source, c.trust_remote_code) for c in unknown])):
            info[c.id]["size"] = None if n is None else float(n)
    measured, unread = task_tokens(config) if replay is None else ({}, None)
    rows, unsized = [], []
    for p in plans:
        cid, size = p.candidate.id, info[p.candidate.id]["size"]
        mine = [r for r in records if r.get("candidate") == cid]
        todo = p.todo if p.needs_trial else []
        tokens = tokens_per_sample(mine, math.nan)
        source = "probes"
        if not math.isfinite(tokens):
            source = "task" if cid in measured else "assumed"
            tokens = measured.get(cid, config.tokens_per_sample)
        rows.append({"candidate": cid, "size": size, "stored": sorted(p.done), "todo": todo,
                     "pruned": bool(p.decision), "tokens_per_sample": tokens, "tokens_from": source,
                     "flops_todo": flops_per_token(config, size, mine) * tokens * sum(todo) if size else None})
        if not size:
            unsized.append(cid)
    return {
        "grid": grid, "target": config.target_samples, "candidates": rows,
        "unsized": unsized, "task_unread": unread,
        "flops_todo": sum(r["flops_todo"] or 0.0 for r in rows),
        "flops_stored": sum(float(r.get("flops") or 0.0) for r in records),
        "flops_full_tuning": full_tuning(config, info, records, measured),
    }


def _explain_finishers(config: ScreenConfig, entries: list[RankingEntry], selected: Optional[str],
                       final: Mapping[str, Forecast]) -> None:
    """Set ``reason`` of each finished candidate other than ``selected``: why the pruning rule never
    stopped it, judged on the final curves (the margin to the selected candidate against the
    uncertainty of the difference at the predictor's level). ``final``: the forecasts of the final ranking."""
    others = [e for e in entries if e.status == "finished" and e.candidate != selected]
    if selected is None or not others:
        return
    if not config.pruning.enabled:
        for e in others:
            e.reason = "ran to the end: pruning is off"
        return
    level = f"{100 * config.predictor.level:g} %"
    best = final.get(selected)
    for e in others:
        own = final.get(e.candidate)
        diff = difference_interval(best, own) if best is not None and own is not None else None
        if diff is not None:
            margin = f"log gap {diff[0]:.3g} against the {level} half-width {diff[1]:.3g} of the difference"
        elif best is not None and own is not None and math.isfinite(own.lo) and math.isfinite(best.hi):
            margin = f"optimistic end {own.lo:.4g} against the pessimistic end {best.hi:.4g} of {selected}"
        else:
            e.reason = "never confidently worse than another candidate: no interval to compare"
            continue
        if confidently_better(best, own) is None:
            e.reason = f"never confidently worse than {selected}, even with the final curves ({margin})"
        else:
            e.reason = (f"confidently worse than {selected} only with the final curves ({margin}), not after any "
                        "earlier probe; a last probe is never stopped (nothing to save)")


def rank(config: ScreenConfig, store: ProbeStore, grid: list[int], backend: str, replay: Optional[Curves],
         wall_seconds: float) -> tuple[Selection, Selector, Curves, list[dict]]:
    """Fit every stored curve, rank the candidates and bill the compute.

    Returns the :class:`~lensray.run.results.Selection`, the selector and curves it was fitted
    with (for the plot) and the stored probe records.
    """
    info = candidate_info(config, replay)
    records = store.get_all()
    ids = [c.id for c in config.zoo]
    sizes = {cid: candidate_size(cid, info[cid]["size"], records) for cid in ids}
    curves = curves_from_store(ids, grid, records, sizes, {cid: info[cid]["family"] for cid in ids})
    if replay is not None and replay.ntk is not None:  # a replay's probes are its table's: so are their NTK features
        curves.ntk = replay.take([replay.ids.index(cid) for cid in ids]).budget(grid[-1]).ntk
    gaps = replay_gaps(replay, grid)
    selector = get_selector(config.predictor.method, config.predictor.level)
    pred = selector.predict(curves, config.target_samples)
    entries = []
    for i, cid in enumerate(ids):
        mine = [r for r in records if r["candidate"] == cid]
        decision = read_decision(store, cid)
        observed = {int(r["n_samples"]) for r in mine if is_ok(r)}
        status, reason, pruned_at, error = "finished", None, None, None
        if decision and decision["status"] == "failed":
            status, error = "failed", str(decision.get("reason") or "failed")
        elif decision and decision["status"] == "pruned":
            status, reason, pruned_at = "pruned", str(decision.get("reason") or "pruned"), decision["n_samples"]
        elif not (expected := set(grid) - gaps.get(cid, set())) <= observed:
            status, error = "failed", f"incomplete: {len(observed)} of {len(expected)} probes stored"
        if status != "failed" and not pred.ok[i]:
            status, error = "failed", pred.errors[i] or "curve could not be fitted"
        ok = status != "failed"
        entries.append(RankingEntry(
            candidate=cid, status=status, predicted_loss=float(pred.loss[i]) if ok else None,
            interval=(float(pred.lo[i]), float(pred.hi[i])) if ok else (None, None), pruned_at=pruned_at,
            params=pred.named_params(i) if ok else None, flops=sum(float(r.get("flops") or 0.0) for r in mine),
            error=error, reason=reason, n_probes=len(observed),
        ))
    order = {"finished": 0, "pruned": 1, "failed": 2}
    entries.sort(key=lambda e: (order[e.status], e.predicted_loss if e.has_prediction else math.inf))
    spent = sum(e.flops for e in entries)
    full = full_tuning(config, info, records)
    gpu_seconds = sum(float(r.get("wall_seconds") or 0.0) * info[r["candidate"]]["gpus"] * info[r["candidate"]]["workers"]
                      for r in records if r["candidate"] in info)
    selected = next((e.candidate for e in entries if e.status != "failed"), None)
    _explain_finishers(config, entries, selected, forecasts_from(curves, pred, config.predictor.level, config.pruning.relative))
    probed = {r["candidate"] for r in records}
    compute = Compute(flops_spent=spent, flops_full_tuning=full, saved_fraction=1.0 - spent / full if full > 0 else None,
                      gpu_seconds=gpu_seconds, wall_seconds=wall_seconds,
                      uncharged=[cid for cid in ids if not sizes[cid] and cid in probed])
    selection = Selection(selected=selected, ranking=entries, compute=compute, backend=backend,
                          target_samples=config.target_samples, grid=grid, predictor=config.predictor.method,
                          notes=list(pred.notes))
    return selection, selector, curves, records
