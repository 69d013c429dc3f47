"""A real screening (``lensray.run.screen.screen``, train backend, local Ray) with its timings.

Reads a screening config (default ``configs/gpu-check.yaml``), builds every tiny candidate into
the cache first (``lensray.engine.models.ensure_tiny``, timed apart from the screening), runs the
screening and prints: the selected candidate, each candidate's status and probes, the wall time
of the screening, the GPU-seconds its probes held (``compute.gpu_seconds`` of ``selection.json``:
probe wall time x GPUs per worker x workers) and their share of the wall time on the local
GPUs, and the FLOPs spent. Exit code 0 when a candidate was selected and none failed, else 1.

``--tiny`` rewrites the config for a CPU dry run: the same families at the tiny default shape,
no GPUs, ``probe.device: cpu``, and probes up to 200 samples.

    python benchmarks/gpu_screen.py configs/gpu-check.yaml --out /tmp/gpu-check/screen
    python benchmarks/gpu_screen.py configs/gpu-check.yaml --tiny --out /tmp/gpu-check-cpu/screen
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lensray.engine.models import ensure_tiny, parse_tiny_id
from lensray.run.config import ScreenConfig, load_config


def tiny_variant(data: dict[str, Any]) -> dict[str, Any]:
    """The config ``data`` (a parsed YAML mapping) shrunk for a CPU dry run: every tiny candidate at its
    family's tiny default shape (a distinct seed each), no GPUs, CPU probes, probes up to 200 samples."""
    out = dict(data)
    zoo = []
    for i, cand in enumerate(data.get("zoo", [])):
        model = cand.get("model") or cand["id"]
        family = parse_tiny_id(model)[0] if model.startswith("tiny:") else None
        if family is None:
            raise SystemExit(f"error: zoo[{i}]: --tiny needs tiny: candidates, got {model!r}")
        zoo.append({**cand, "model": f"tiny:{family}:seed={i}", "gpus": 0, "cpus": 1})
    out["zoo"] = zoo
    out["ray"] = {**data.get("ray", {}), "num_gpus": 0, "num_cpus": None}
    out["grid"] = {**data.get("grid", {}), "start": 50, "factor": 2, "max_samples": 200}
    out["probe"] = {**data.get("probe", {}), "device": "cpu", "micro_batch": 16}
    return out


def load(path: str, tiny: bool, out: str) -> ScreenConfig:
    """The validated config of ``path`` (its tiny variant with ``tiny``), writing to ``out``."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if tiny:
        data = tiny_variant(data)
    return load_config(data, {"storage.path": out})


def summarise(config: ScreenConfig, selection: dict[str, Any], wall: float, build: float) -> dict[str, Any]:
    """The figures of one screening from its ``selection.json`` content."""
    compute = selection["compute"]
    gpus = config.ray.num_gpus or 0
    gpu_seconds = float(compute.get("gpu_seconds") or 0.0)
    return {
        "config": config.name, "selected": selection["selected"],
        "candidates": {e["candidate"]: {"status": e["status"], "probes": e["n_probes"], "error": e["error"]}
                       for e in selection["ranking"]},
        "failed": [e["candidate"] for e in selection["ranking"] if e["status"] == "failed"],
        "build_seconds": round(build, 1), "screen_wall_seconds": round(wall, 1),
        "driver_wall_seconds": round(float(compute["wall_seconds"]), 1),
        "gpu_seconds": round(gpu_seconds, 1),
        "gpu_share": round(gpu_seconds / (wall * gpus), 3) if gpus and wall > 0 else None,
        "flops_spent": compute["flops_spent"], "saved_fraction": compute["saved_fraction"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="configs/gpu-check.yaml")
    p.add_argument("--out", required=True, help="output folder of the screening (must hold no probe results)")
    p.add_argument("--tiny", action="store_true", help="the CPU dry-run variant of the config")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    config = load(args.config, args.tiny, args.out)
    start = time.perf_counter()
    for cand in config.zoo:
        if cand.source.startswith("tiny:"):
            ensure_tiny(cand.source)
    build = time.perf_counter() - start

    from lensray.run.screen import screen

    start = time.perf_counter()
    selection = screen(config, out=args.out)
    out = summarise(config, selection, time.perf_counter() - start, build)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>20}: {v}")
    return 0 if out["selected"] and not out["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
