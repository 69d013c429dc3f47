"""``lensray probe``: run the probes of one candidate on nested subsets and print its curve.

``--task`` is 'synthetic' or a YAML file: task fields at the top level, or ``task:`` and
``probe:`` sections (a screening config works as is). ``--device``, ``--seed`` and ``--ntk``
override the probe section when given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lensray.errors import LensrayInputError
from lensray.engine.probe import ProbeConfig, ProbeRunner

DEVICES = ("auto", "cpu", "cuda")


def parse_sizes(text: str) -> list[int]:
    """``"0,200,400"`` -> [0, 200, 400]; sizes must be distinct non-negative integers."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise LensrayInputError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 0 for s in sizes) or len(set(sizes)) != len(sizes):
        raise LensrayInputError(f"--sizes must be distinct integers >= 0, got {text!r}")
    return sorted(sizes)


def _validated(cls: Any, raw: Any, spec: str, section: str) -> Any:
    from pydantic import ValidationError

    if not isinstance(raw, dict):
        raise LensrayInputError(f"--task {spec}: {section} must be a mapping")
    try:
        return cls(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        got = f" (got {err['input']!r:.60})" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
        raise LensrayInputError(f"--task {spec}: {section}.{field}: {err['msg']}{got}") from None


def load_configs(spec: str) -> tuple[Any, dict[str, Any]]:
    """(TaskConfig, probe settings) from 'synthetic' or a YAML file.

    The YAML holds task fields at the top level, or ``task:`` and optionally ``probe:``
    sections (a screening config works as is).
    """
    import yaml

    from lensray.engine.data import TaskConfig

    if spec == "synthetic":
        return TaskConfig(), {}
    path = Path(spec)
    if not path.is_file():
        raise LensrayInputError(f"--task: {spec} is neither 'synthetic' nor a YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LensrayInputError(f"--task: {spec} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise LensrayInputError(f"--task: {spec} must hold a mapping of task fields")
    if "task" not in raw:
        return _validated(TaskConfig, raw, spec, "task"), {}
    probe = raw.get("probe") or {}
    _validated(ProbeConfig, probe, spec, "probe")
    return _validated(TaskConfig, raw["task"], spec, "task"), dict(probe)


def load_task_config(spec: str) -> Any:
    """The TaskConfig of ``--task`` ('synthetic' or a YAML file)."""
    return load_configs(spec)[0]


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
    if args.device not in DEVICES:
        raise LensrayInputError(f"--device: must be one of {', '.join(DEVICES)}, got {args.device!r}")
    task, settings = load_configs(args.task)
    if args.device != "auto" or "device" not in settings:  # flags override the YAML's probe section
        settings["device"] = args.device
    if args.seed != 0 or "seed" not in settings:
        settings["seed"] = args.seed
    settings["ntk"] = bool(args.ntk or settings.get("ntk", False))
    probe = _validated(ProbeConfig, settings, args.task, "probe")
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
