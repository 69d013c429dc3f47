"""``lensray screen``: validate the input (before any Ray work), run the screening, print the result.

Two forms::

    lensray screen CONFIG.yaml [--out DIR] [--resume] [--set KEY=VALUE ...]
    lensray screen --replay CURVES.csv --max-samples N [CONFIG.yaml] [--out DIR] [--resume]
    lensray screen ... --plan     # what it would probe and its worst-case compute; no Ray, nothing written

``--set`` and the shortcut flags (``--out`` is ``--set storage.path=...``, see ``lensray.cli.main``)
become config overrides (:func:`lensray.run.config.load_config`).

Exit codes: 0 when a candidate was selected (a warning line names each failed candidate), 2 for bad
input (raised as LensrayInputError, printed by ``lensray.cli.main``; nothing is screened), 3 when
every candidate failed (:data:`ALL_FAILED`: the outputs are written all the same, with each
reason). 1 is left to crashes (a Python traceback).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

ALL_FAILED = 3
"""Exit code of a run in which every candidate failed."""


def cli_main(args: argparse.Namespace) -> int:
    """Run ``lensray screen``; returns the exit code."""
    from lensray.run.config import run_inputs
    from lensray.redact import install_log_redaction

    install_log_redaction()  # before anything logs: secret env values never reach a log line
    config, curves = run_inputs(args.config, dict(args.sets), replay=args.replay,
                                warn=lambda line: _say(f"warning: {line}", file=sys.stderr))
    if args.plan:
        from lensray.run.ranking import plan_bill

        return print_plan(plan_bill(config, replay=curves))

    from lensray.run.screen import screen

    selection = screen(config, resume=args.resume, backend="train" if curves is None else "replay", replay=curves)
    return summarise(selection, selection.get("output") or config.storage.path)


def print_plan(plan: dict, stream: Any = None) -> int:
    """Print what a run would probe and its worst-case compute (``lensray.run.ranking.plan_bill``) on
    ``stream`` (default: the standard output at call time); returns 0."""
    stream = sys.stdout if stream is None else stream
    grid = ", ".join(f"{d:,}" for d in plan["grid"])
    _say(f"grid: {grid} (D* = {plan['target']:,})", file=stream)
    _say(f"{'candidate':32s} {'params':>10s} {'stored':>6s} {'to run':>6s} {'tokens/sample':>14s} "
         f"{'FLOPs to run':>13s}", file=stream)
    for r in plan["candidates"]:
        size = f"{r['size']:.3g}" if r["size"] else "unknown"
        flops = "pruned" if r["pruned"] else ("-" if r["flops_todo"] is None else f"{r['flops_todo']:.3g}")
        tokens = f"{r['tokens_per_sample']:.4g} {r['tokens_from'][0]}"
        _say(f"{r['candidate'][:32]:32s} {size:>10s} {len(r['stored']):6d} {len(r['todo']):6d} {tokens:>14s} "
             f"{flops:>13s}", file=stream)
    full = plan["flops_full_tuning"]
    share = f" ({100 * (plan['flops_todo'] + plan['flops_stored']) / full:.2f}% of full tuning)" if full else ""
    _say(f"worst case, nobody pruned: {plan['flops_todo']:.3g} FLOPs to run + {plan['flops_stored']:.3g} stored"
         f"{share}; full tuning {full:.3g} FLOPs", file=stream)
    _say("training tokens per sample (epochs counted): p = measured by the stored probes, t = the task's train rows "
         "tokenised with the candidate's tokenizer, a = assumed (tokens_per_sample)", file=stream)
    if plan.get("task_unread"):
        _say(f"the task could not be tokenised here ({plan['task_unread']}); its figures are assumed", file=stream)
    if plan["unsized"]:
        _say(f"not billed, {len(plan['unsized'])} of {len(plan['candidates'])} (no size, and no model config to "
             f"count it from here: not a tiny id, a local folder or a cached hub id): {', '.join(plan['unsized'])}",
             file=stream)
    return 0


def summarise(selection: dict, out: str, stream: Any = None) -> int:
    """Print the ``selection.json`` dict (secret env values redacted; the predictor's notes on stderr); returns the
    exit code (:data:`ALL_FAILED` when every candidate failed). ``stream``: default the standard output at call time."""
    stream = sys.stdout if stream is None else stream
    ranking = selection["ranking"]
    failed = [e for e in ranking if e["status"] == "failed"]
    for e in failed:
        _say(f"warning: candidate {e['candidate']} failed: {e['error']}", file=sys.stderr)
    for note in selection.get("notes", []):
        _say(f"note: {note}", file=sys.stderr)
    bill = selection["compute"]
    saved = bill["saved_fraction"]
    _say(f"selected: {selection['selected']}", file=stream)
    for rank, e in enumerate(ranking, start=1):
        loss = "-" if e["predicted_loss"] is None else f"{e['predicted_loss']:.4f}"
        _say(f"{rank:4d}  {e['status']:8s}  {loss:>8s}  {e['candidate']}", file=stream)
    _say(f"compute: {bill['flops_spent']:.3g} FLOPs spent, {bill['flops_full_tuning']:.3g} for full tuning"
         + (f" (saved {100 * saved:.2f}%)" if saved is not None else "")
         + f", wall {bill['wall_seconds']:.1f} s"
         + (f" (+ {sum(bill['resume_wall_seconds']):.1f} s resumed)" if bill.get("resume_wall_seconds") else "")
         + f"; outputs in {out}", file=stream)
    if len(failed) == len(ranking):
        _say(f"error: every candidate failed ({len(failed)} of {len(ranking)}; reasons above and in report.md); "
             f"outputs in {out}", file=sys.stderr)
        return ALL_FAILED
    return 0


def _say(text: str, file: Any) -> None:
    """Print one line with secret environment values redacted."""
    from lensray.redact import redact

    print(redact(text), file=file)
