"""Cost of the NTK features (``lensray.engine.ntk.ntk_features``): time and peak memory.

Builds a model (a preset of ``benchmarks/probe_throughput.py`` or a candidate id) on the device,
takes ``--samples`` language-modelling rows of ``--seq-len`` tokens as the probe set and computes
the sketched NTK at the default sketch size (``lensray.engine.ntk.DEFAULT_SKETCH_DIM``) unless
``--sketch-dim`` is given. Reports the seconds of the features, the seconds of as many plain
per-sample forward and backward passes (the floor of a method that needs one gradient per
sample), and the peak memory: on a GPU ``torch.cuda.max_memory_allocated`` during the features
against the memory allocated before them (the model); on a CPU the process's peak RSS.

    python benchmarks/ntk_cost.py --model gpt2-125m --device cuda --seq-len 512
    python benchmarks/ntk_cost.py --model gpt2-125m --tiny --device cpu --seq-len 32 --samples 8
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Any

import torch

from lensray.engine.data import collate, encode
from lensray.engine.ntk import DEFAULT_SKETCH_DIM, ntk_features, per_sample_nll
from probe_throughput import build, lm_rows, print_figures, resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    model, tokenizer, kind = build(args.model, args.tiny, device)
    model.to(device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    encoded = encode(lm_rows(args.samples, args.seq_len), tokenizer, kind, args.seq_len)
    batch = collate(encoded, tokenizer.pad_token_id, kind)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(args.samples)]

    model.eval()
    _sync(device)
    start = time.perf_counter()
    for row in rows:  # the floor: one forward and backward pass per sample, nothing sketched
        per_sample_nll(model, row, device).backward()
    _sync(device)
    plain = time.perf_counter() - start
    model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    _sync(device)
    start = time.perf_counter()
    features = ntk_features(model, batch, learning_rate=1e-4, steps=100, n_samples=args.samples,
                            sketch_dim=args.sketch_dim, device=device)
    _sync(device)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "model": args.model + (" (tiny)" if args.tiny else ""), "n_params": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "n_samples": features.n_samples, "seq_len": args.seq_len, "sketch_dim": features.sketch_dim,
        "seconds": round(seconds, 3), "plain_backward_seconds": round(plain, 3),
        "F": features.F, "trace": features.trace, "top_eigenvalue": float(features.eigenvalues[0]),
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_memory_gib=round(peak / 2**30, 3), allocated_before_gib=round(before / 2**30, 3),
                   extra_memory_gib=round((peak - before) / 2**30, 3), memory="torch.cuda.max_memory_allocated")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.update(peak_memory_gib=round(peak / 2**30, 3), memory="process peak RSS")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-125m", help="gpt2-125m, llama-1b, or a candidate id")
    p.add_argument("--tiny", action="store_true", help="the preset's family at a tiny shape (CPU dry runs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seq-len", type=int, default=512, help="tokens per probe-set sample")
    p.add_argument("--samples", type=int, default=32, help="probe-set size n (the probe engine's default)")
    p.add_argument("--sketch-dim", type=int, default=DEFAULT_SKETCH_DIM, help="CountSketch size k")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = measure(args)
    print_figures(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
