"""``lensray screen``: validate the input (before any Ray work), run the screening, print the result.

Two forms::

    lensray screen CONFIG.yaml [--out DIR] [--resume] [--address ADDR]
    lensray screen --replay CURVES.csv --max-samples N --target-samples N [--out DIR] [--resume]
    lensray screen ... --plan     # what it would probe and its worst-case compute; no Ray, nothing written

Exit code 0 when a candidate was selected (a warning line names failed candidates), 1 when every
candidate failed, 2 for bad input (raised as LensrayInputError, printed by ``lensray.cli.main``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lensray.errors import LensrayInputError

DEFAULT_REPLAY_OUT = "runs/replay"


def replay_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """Config and curves of a replay run; the zoo is the table's rows (or the config's zoo)."""
    from lensray.run.config import load_config
    from lensray.core.curves import load_curves_csv

    if args.max_samples is None:
        raise LensrayInputError("--max-samples: required with --replay (the probe budget D_max)")
    curves = load_curves_csv(args.replay, allow_missing=True)
    curves.budget(args.max_samples)  # at least 3 points with D > 0 under the budget
    overrides = {"storage.path": args.out, "ray.address": args.address,
                 "grid.max_samples": args.max_samples, "target_samples": args.target_samples}
    zoo = [{"id": cid, **({"size": float(s)} if s == s else {}), "family": f}
           for cid, s, f in zip(curves.ids, curves.size, curves.family)]
    positive = [int(d) for d in curves.D if d > 0]
    base = {"name": f"replay-{Path(args.replay).stem}", "zoo": zoo, "storage": {"path": DEFAULT_REPLAY_OUT},
            "grid": {"start": positive[0], "factor": 2, "zero_shot": bool((curves.D == 0).any())}}
    if args.config is not None:
        # the config's settings (predictor, pruning, ...) on the table's zoo unless it lists its own
        given = _read_yaml(args.config)
        grid = given.get("grid", {})
        if not isinstance(grid, dict):
            raise LensrayInputError(f"grid: must be a mapping of grid settings (got {grid!r:.60})")
        config = load_config({**base, **given, "grid": {**base["grid"], **grid}}, overrides,
                             check_task=False)
        missing = [c.id for c in config.zoo if c.id not in curves.ids]
        if missing:
            raise LensrayInputError(f"zoo: candidate {missing[0]!r} has no row in {args.replay} (column 'config name')")
        curves = curves.take([curves.ids.index(c.id) for c in config.zoo])
    else:
        config = load_config(base, overrides, check_task=False)
    _warn_incomplete(curves.budget(args.max_samples), args.replay, {c.id for c in config.zoo if c.size})
    return config, curves


def _warn_incomplete(seen: Any, path: str, sized: set[str]) -> None:
    """One warning line each for missing losses under the budget (those probes are skipped) and
    rows without a size, in the table or in the config's zoo (``sized``): their probes are not billed."""
    import numpy as np

    holes = [(cid, d) for cid, sizes in seen.missing().items() for d in sizes]
    if holes:
        where = "; ".join(f"row '{c}' column '{d}'" for c, d in holes[:3]) + (" ..." if len(holes) > 3 else "")
        _say(f"warning: {path}: {len(holes)} loss(es) missing under the budget ({where}); those probes are "
             "skipped and the candidates fitted on the rest", file=sys.stderr)
    unsized = [cid for cid, s in zip(seen.ids, seen.size) if not np.isfinite(s) and cid not in sized]
    if unsized:
        names = ", ".join(unsized[:3]) + (" ..." if len(unsized) > 3 else "")
        _say(f"warning: {path}: no size for {len(unsized)} candidate(s) ({names}); their probes are not billed "
             "and the saved fraction covers the others", file=sys.stderr)


def _read_yaml(path: str) -> dict:
    """A config file as a mapping (safe loader), errors naming the file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LensrayInputError(f"config: file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LensrayInputError(f"config: {path} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(data, dict):
        raise LensrayInputError(f"config: {path} must hold a mapping of keys")
    return data


def cli_main(args: argparse.Namespace) -> int:
    """Run ``lensray screen``; returns the exit code."""
    from lensray.run.config import load_config
    from lensray.redact import install_log_redaction

    install_log_redaction()  # before anything logs: secret env values never reach a log line
    if args.replay:
        config, curves = replay_config(args)
        backend = "replay"
    else:
        overrides = {"storage.path": args.out, "ray.address": args.address,
                     "grid.max_samples": args.max_samples, "target_samples": args.target_samples}
        config, curves, backend = load_config(args.config, overrides), None, "train"
        check_file_task(config)

    if args.plan:
        from lensray.run.ranking import plan_bill

        return print_plan(plan_bill(config, replay=curves))

    from lensray.run.screen import screen

    selection = screen(config, resume=args.resume, backend=backend, replay=curves)
    return summarise(selection, config.storage.path)


def print_plan(plan: dict, stream: Any = None) -> int:
    """Print what a run would probe and its worst-case compute (``lensray.run.screen.plan_bill``) on
    ``stream`` (default: the standard output at call time); returns 0."""
    stream = sys.stdout if stream is None else stream
    grid = ", ".join(f"{d:,}" for d in plan["grid"])
    _say(f"grid: {grid} (D* = {plan['target']:,})", file=stream)
    _say(f"{'candidate':32s} {'params':>10s} {'stored':>6s} {'to run':>6s} {'FLOPs to run':>13s}", file=stream)
    for r in plan["candidates"]:
        size = f"{r['size']:.3g}" if r["size"] else "unknown"
        flops = "pruned" if r["pruned"] else ("-" if r["flops_todo"] is None else f"{r['flops_todo']:.3g}")
        _say(f"{r['candidate'][:32]:32s} {size:>10s} {len(r['stored']):6d} {len(r['todo']):6d} {flops:>13s}",
             file=stream)
    full = plan["flops_full_tuning"]
    share = f" ({100 * (plan['flops_todo'] + plan['flops_stored']) / full:.2f}% of full tuning)" if full else ""
    _say(f"worst case, nobody pruned: {plan['flops_todo']:.3g} FLOPs to run + {plan['flops_stored']:.3g} stored"
         f"{share}; full tuning {full:.3g} FLOPs", file=stream)
    if plan["assumed_tokens_per_sample"] is not None:
        _say(f"probes not run yet are estimated at tokens_per_sample = {plan['assumed_tokens_per_sample']:g} tokens per "
             "sample (or the stored probes' own); a run bills the tokens it trains on", file=stream)
    if plan["unsized"]:
        _say(f"not billed (no size, and no model config to count it from): {', '.join(plan['unsized'])}",
             file=stream)
    return 0


def check_file_task(config: Any) -> None:
    """Before any Ray work: a local-file task must load and its train split hold ``grid.max_samples`` rows.

    (``load_config`` sizes the synthetic task itself; hub tasks are left to the workers.)
    """
    from lensray.run.config import check_train_size
    from lensray.engine.data import _local_files, load_task

    if config.task.source != "synthetic" and _local_files(config.task.source) is not None:
        import datasets

        datasets.disable_progress_bars()  # an error stays one line; the driver prints its own progress
        check_train_size(config, len(load_task(config.task).train))


def summarise(selection: dict, out: str, stream=sys.stdout) -> int:
    """Print the selection (secret env values redacted); returns the exit code (1 when every candidate failed)."""
    ranking = selection["ranking"]
    failed = [e for e in ranking if e["status"] == "failed"]
    for e in failed:
        _say(f"warning: candidate {e['candidate']} failed: {e['error']}", file=sys.stderr)
    bill = selection["compute"]
    saved = bill["saved_fraction"]
    _say(f"selected: {selection['selected']}", file=stream)
    for rank, e in enumerate(ranking, start=1):
        loss = "-" if e["predicted_loss"] is None else f"{e['predicted_loss']:.4f}"
        _say(f"{rank:4d}  {e['status']:8s}  {loss:>8s}  {e['candidate']}", file=stream)
    _say(f"compute: {bill['flops_spent']:.3g} FLOPs spent, {bill['flops_full_tuning']:.3g} for full tuning"
         + (f" (saved {100 * saved:.2f}%)" if saved is not None else "")
         + f", wall {bill['wall_seconds']:.1f} s; outputs in {out}", file=stream)
    if len(failed) == len(ranking):
        _say("error: every candidate failed", file=sys.stderr)
        return 1
    return 0


def _say(text: str, file: Any) -> None:
    """Print one line with secret environment values redacted."""
    from lensray.redact import redact

    print(redact(text), file=file)
