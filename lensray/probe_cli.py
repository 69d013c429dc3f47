"""``lensray probe``: run the probes of one candidate on nested subsets and print its curve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lensray.errors import LensrayInputError
from lensray.probe import ProbeConfig, ProbeRunner


def parse_sizes(text: str) -> list[int]:
    """``"0,200,400"`` -> [0, 200, 400]; sizes must be distinct non-negative integers."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise LensrayInputError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 0 for s in sizes) or len(set(sizes)) != len(sizes):
        raise LensrayInputError(f"--sizes must be distinct integers >= 0, got {text!r}")
    return sorted(sizes)


def load_task_config(spec: str) -> Any:
    """'synthetic' or a YAML file holding a task mapping (top level, or under a ``task:`` key)."""
    import yaml
    from pydantic import ValidationError

    from lensray.data import TaskConfig

    if spec == "synthetic":
        return TaskConfig()
    path = Path(spec)
    if not path.is_file():
        raise LensrayInputError(f"--task: {spec} is neither 'synthetic' nor a YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LensrayInputError(f"--task: {spec} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise LensrayInputError(f"--task: {spec} must hold a mapping of task fields")
    raw = raw.get("task", raw)
    try:
        return TaskConfig(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise LensrayInputError(f"--task {spec}: task.{field}: {err['msg']}") from None


def _table(results: list[dict[str, Any]]) -> str:
    head = f"{'D':>7} {'status':>8} {'test_loss':>10} {'steps':>6} {'tokens':>9} {'GFLOPs':>9} {'seconds':>8}"
    lines = [head]
    for r in results:
        loss = f"{r['test_loss']:.4f}" if r["test_loss"] is not None else "-"
        lines.append(f"{r['n_samples']:>7} {r['status']:>8} {loss:>10} {r['steps']:>6} {r['tokens']:>9} "
                     f"{r['flops'] / 1e9:>9.3f} {r['wall_seconds']:>8.2f}")
        if r["error"]:
            lines.append(f"{'':>7} {r['error']}")
        if r["ntk"]:
            lines.append(f"{'':>7} NTK: F={r['ntk']['F']:.4g} trace={r['ntk']['trace']:.4g}")
    return "\n".join(lines)


def cli_main(args: argparse.Namespace) -> int:
    """Run the probes; print a table, or one JSON object with ``--json``."""
    sizes = parse_sizes(args.sizes)
    task = load_task_config(args.task)
    probe = ProbeConfig(device=args.device, seed=args.seed, ntk=args.ntk)
    runner = ProbeRunner(args.model, task, probe).load()
    runner.data.subset(sizes[-1])  # a size larger than the train split fails here, before any training
    if not args.json:
        print(f"{args.model} ({runner.kind}, {runner.n_params:,} parameters) on {task.source}: {runner.data.summary()}",
              file=sys.stderr)
    results = []
    for d in sizes:
        results.append(runner.run(d).to_dict())
        if not args.json:
            print(f"  D={d}: {results[-1]['status']} in {results[-1]['wall_seconds']:.1f} s", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": args.model, "kind": runner.kind, "n_params": runner.n_params,
                          "task": task.model_dump(mode="json"), "bad_rows": runner.data.bad_rows,
                          "probes": results}))
    else:
        print(_table(results))
    return 0 if all(r["status"] == "ok" for r in results) else 1
