"""What the NTK features cost per probe: the same candidate's probes with ``probe.ntk`` off and on.

One process, one model loaded twice (the same weights), the same probe sizes in the same order;
the wall time of every probe is timed with and without the features (default probe set n = 32,
sketch k = 32768). The kernel depends on the pre-trained weights only, so a candidate pays it
at its first probe and later probes only evaluate F at their own steps.

    python benchmarks/ntk_probe_cost.py --model tiny:gpt2:n_layer=2,n_embd=64 --sizes 0,200,400,800,1600
"""

from __future__ import annotations

import argparse
import json
import time

from lensray.engine.data import TaskConfig
from lensray.engine.probe import ProbeConfig, ProbeRunner


def measure(model: str, sizes: list[int], repeats: int = 1) -> dict:
    """Wall seconds per probe with NTK off and on (best of ``repeats`` whole sweeps, interleaved)."""
    task = TaskConfig(source="synthetic", max_length=64, test_size=64, validation_size=16)
    base = {"learning_rate": 1e-3, "epochs": 1, "micro_batch": 16, "device": "cpu", "eval_batch": 64}
    best: dict[str, list[float]] = {}
    ntk_seconds = None
    for _ in range(repeats):
        for label, ntk in (("off", False), ("on", True)):
            runner = ProbeRunner(model, task, ProbeConfig(**base, ntk=ntk)).load()
            times = []
            for d in sizes:
                start = time.perf_counter()
                result = runner.run(d)
                times.append(time.perf_counter() - start)
                if ntk and result.ntk:
                    ntk_seconds = result.ntk["seconds"]
            best[label] = times if label not in best else [min(a, b) for a, b in zip(best[label], times)]
    extra = [on - off for on, off in zip(best["on"], best["off"])]
    return {"model": model, "sizes": sizes, "n_params": runner.n_params, "off_seconds": best["off"],
            "on_seconds": best["on"], "extra_seconds": extra, "kernel_seconds": ntk_seconds,
            "extra_per_probe_mean": sum(extra) / len(extra),
            "extra_share": sum(extra) / sum(best["off"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:gpt2:n_layer=2,n_embd=64")
    parser.add_argument("--sizes", default="0,200,400,800,1600")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(measure(args.model, [int(s) for s in args.sizes.split(",")], args.repeats), indent=2))


if __name__ == "__main__":
    main()
