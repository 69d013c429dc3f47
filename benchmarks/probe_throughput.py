"""Training throughput of the probe engine: tokens/s and model-FLOPs utilisation (MFU).

Runs the real probe training loop (``lensray.engine.probe.ProbeRunner``: AdamW, autocast, gradient
accumulation, target-only loss) on fixed-length language-modelling rows and reports

- tokens/s: training tokens processed per second of training (evaluation excluded);
- MFU: 6 * N * tokens/s divided by the device's peak FLOP/s (attention-score FLOPs are not
  counted, as in the papers' compute accounting). The peak is a datasheet figure for known
  GPUs (dense bf16, or fp32 with --no-bf16), ``--peak-tflops`` when given, and on CPU the
  best fp32 matrix-multiply rate measured on the spot with the same number of threads.

Models: any id that ``lensray.engine.models.load_candidate`` takes (``tiny:gpt2:n_layer=2``, a folder,
a hub id), or a preset built from config on the measuring device: ``gpt2-125m`` (GPT-2 small
shape, 124M) and ``llama-1b`` (TinyLlama shape, 1.1B); ``--tiny`` builds a preset's family at a
tiny shape, for dry runs of the GPU commands on a CPU.

    python benchmarks/probe_throughput.py --model gpt2-125m --device cpu --seq-len 128 --steps 4
    python benchmarks/probe_throughput.py --model llama-1b --device cuda --seq-len 512 --micro-batch 16
    python benchmarks/probe_throughput.py --model llama-1b --tiny --device cpu --no-bf16 --seq-len 64 --steps 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import torch

from lensray.engine.data import Example, TaskConfig, TaskData
from lensray.engine.models import char_tokenizer, load_candidate
from lensray.engine.probe import ProbeConfig, ProbeRunner

# dense peak FLOP/s per GPU (bf16 tensor cores, fp32 non-tensor), from vendor datasheets
GPU_PEAKS = {
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12),
    "A10G": (70e12, 31.2e12),
}


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-125m": ("gpt2", {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}),
    "llama-1b": ("llama", {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                           "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                           "max_position_embeddings": 2048}),
}
"""Models built from config in memory: family and config fields."""

TINY_SHAPES: dict[str, dict[str, Any]] = {
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 4},
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2},
}
"""``--tiny``: the preset's family, vocabulary and attention layout at a few million parameters
(CPU dry runs of the GPU benchmarks)."""


def resolve_device(device: str) -> "torch.device":
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU")
    return torch.device(device)


def preset_model(name: str, tiny: bool = False, device: "torch.device | str" = "cpu") -> Any:
    """A preset built from config (seeded init) directly on ``device``, or None for other ids."""
    import transformers

    if name not in PRESETS:
        return None
    family, fields = PRESETS[name]
    fields = {**fields, **(TINY_SHAPES[family] if tiny else {})}
    config = transformers.AutoConfig.for_model(family, **fields)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 2, 1
    torch.manual_seed(0)
    with torch.device(device):  # a 1B model initialised on the GPU takes seconds, on the CPU minutes
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def build(model_id: str, tiny: bool, device: "torch.device") -> tuple[Any, Any, str]:
    """(model, tokenizer, kind) of a preset (character tokenizer) or a candidate id."""
    model = preset_model(model_id, tiny, device)
    if model is not None:
        return model, char_tokenizer(), "causal"
    if tiny:
        raise SystemExit(f"error: --tiny applies to the presets {sorted(PRESETS)}, not to {model_id!r}")
    return load_candidate(model_id)


def cpu_peak_flops(threads: int, size: int = 1024, reps: int = 5) -> float:
    """Best fp32 matmul FLOP/s measured with ``threads`` threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = 0.0
    try:
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(saved)
    return best


def gpu_peak_flops(bf16: bool) -> tuple[float, str]:
    name = torch.cuda.get_device_name()
    for key, (peak_bf16, peak_fp32) in GPU_PEAKS.items():
        if key in name:
            return (peak_bf16 if bf16 else peak_fp32), f"{name} datasheet ({'bf16' if bf16 else 'fp32'} dense)"
    raise SystemExit(f"error: unknown GPU {name!r}: pass --peak-tflops")


def lm_rows(n: int, seq_len: int, seed: int = 0) -> list[Example]:
    """Rows of seq_len - 1 characters (+ EOS = seq_len tokens with the character tokenizer)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    return [Example("", "".join(rng.choice(letters) for _ in range(seq_len - 1))) for _ in range(n)]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer, kind = build(args.model, args.tiny, resolve_device(args.device))
    per_step = args.micro_batch * args.grad_accum
    rows = lm_rows((args.steps + args.warmup_steps) * per_step + 2, args.seq_len)
    data = TaskData(train=rows[2:], validation=[], test=rows[:2], n_rows=len(rows))
    probe = ProbeConfig(learning_rate=1e-5, epochs=1, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
                        device=args.device, bf16=args.bf16, warmup_ratio=0.0, cpu_threads=args.threads)
    task = TaskConfig(max_length=args.seq_len)
    runner = ProbeRunner.from_model(model, tokenizer, kind, data, task=task, probe=probe, name=args.model)
    runner.run(args.warmup_steps * per_step)  # allocator, kernels, threads warm up
    result = runner.run(args.steps * per_step)
    if result.status != "ok":
        raise SystemExit(f"probe {result.status}: {result.error}")
    tokens_per_s = result.tokens / result.train_seconds
    achieved = 6.0 * result.n_params * tokens_per_s
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "--peak-tflops"
    elif runner.device.type == "cuda":
        peak, source = gpu_peak_flops(args.bf16)
    else:
        threads = args.threads or (1 if result.n_params < 20_000_000 else torch.get_num_threads())
        peak, source = cpu_peak_flops(threads), f"measured fp32 matmul peak, {threads} thread(s)"
    device = torch.cuda.get_device_name() if runner.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads max)"
    return {
        "model": args.model + (" (tiny)" if args.tiny else ""), "n_params": result.n_params, "device": device,
        "dtype": "bf16 autocast" if (args.bf16 and runner.device.type == "cuda") else "fp32",
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
        "steps": result.steps, "tokens": result.tokens, "train_seconds": round(result.train_seconds, 3),
        "tokens_per_s": round(tokens_per_s, 1), "model_tflops_per_s": round(achieved / 1e12, 4),
        "peak_tflops_per_s": round(peak / 1e12, 3), "peak_source": source, "mfu": round(achieved / peak, 4),
        "peak_memory_gib": round(result.peak_memory_bytes / 2**30, 2),
    }


def print_figures(out: dict[str, Any], as_json: bool) -> None:
    """Print a benchmark's figures: one JSON object, or one ``name: value`` line each."""
    if as_json:
        print(json.dumps(out))
        return
    width = max(map(len, out), default=0)
    for k, v in out.items():
        print(f"{k:>{width}}: {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny:gpt2:n_layer=2,n_embd=64", help="gpt2-125m, llama-1b, or a candidate id")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="the preset's family at a tiny shape (CPU dry runs)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="measured optimiser steps")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 on GPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the probe's choice)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of the device for MFU")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    print_figures(measure(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
