"""``lensray probe``: run the probes of one candidate on nested subsets and print its curve.

``--task`` is 'synthetic' or a YAML file (:func:`load_probe_config`); ``--set probe.KEY=VALUE``
and its shortcuts ``--device``, ``--seed`` and ``--ntk`` override its probe section.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

from lensray.engine.data import TaskConfig
from lensray.engine.probe import ProbeConfig, ProbeRunner
from lensray.errors import LensrayInputError


def parse_sizes(text: str) -> list[int]:
    """``"0,200,400"`` -> [0, 200, 400]; sizes must be distinct non-negative integers."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise LensrayInputError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 0 for s in sizes) or len(set(sizes)) != len(sizes):
        raise LensrayInputError(f"--sizes must be distinct integers >= 0, got {text!r}")
    return sorted(sizes)


class ProbeCommandConfig(BaseModel):
    """What ``lensray probe`` reads from ``--task``: its task and probe sections (other keys ignored)."""

    model_config = ConfigDict(extra="ignore")

    task: TaskConfig = Field(default_factory=TaskConfig, description="the fine-tuning task")
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="probe hyperparameters")


def load_probe_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ProbeCommandConfig:
    """Task and probe settings from 'synthetic' or a YAML file, with ``overrides`` (``probe.seed``, ...).

    The YAML holds task fields at the top level, or ``task:`` and optionally ``probe:``
    sections (a screening config works as is).
    """
    from lensray.run.config import read_yaml, validate

    for key in overrides or {}:
        if not key.startswith(("task.", "probe.")):
            raise LensrayInputError(f"--set {key}: lensray probe takes task.* and probe.* keys only")
    if spec == "synthetic":
        raw: dict[str, Any] = {}
    elif not Path(spec).is_file():
        raise LensrayInputError(f"--task: {spec} is neither 'synthetic' nor a YAML file")
    else:
        raw = read_yaml(spec, what=f"--task {spec}")
        raw = {k: v for k, v in raw.items() if v is not None} if "task" in raw else {"task": raw}
    return validate(ProbeCommandConfig, raw, overrides, where=f"--task {spec}: ")


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
    settings = load_probe_config(args.task, dict(args.sets))
    task, probe = settings.task, settings.probe
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
