"""A validation zoo of real fine-tunes: small language models pre-trained in-house, their true
fine-tuning curves on a downstream task, and the NTK features of every probe.

What it builds (all under ``--work``, default ``runs/validation-zoo``; nothing there is committed):

1. Three **pre-training corpora** of real text found on a Debian system:

   - ``licences``: the licence texts in ``/usr/share/common-licenses`` and the package copyright
     files ``/usr/share/doc/*/copyright``. Licence: each text carries its own terms (GPL, LGPL,
     Apache-2.0, BSD, MIT, Artistic, GFDL, CC0 ...); the licence texts themselves may be copied
     verbatim; the copyright files are part of their Debian packages (DFSG-free licences).
   - ``pydoc``: the docstrings of the Python standard library's modules (``ast`` over
     ``/usr/lib/python3.X/**/*.py``, test packages excluded). Licence: PSF License v2.
   - ``changelogs``: the Debian package changelogs ``/usr/share/doc/*/changelog.Debian.gz``.
     Licence: that of each package (Debian packaging, DFSG-free).

   Text is normalised to ASCII (NFKD, other characters dropped), which the candidates'
   character tokenizer (``lensray.engine.models.char_tokenizer``) covers.
2. A **downstream task** from different real text: the command-line options of the man pages
   in ``/usr/share/man/man1`` and ``man8`` (``.TP`` entries whose tag starts with ``-``),
   input ``"<command> <option>"`` and target the first sentence of the option's description,
   both clipped at a word boundary (e.g. ``ls -a, --all`` -> ``do not ignore entries starting
   with .``; for generated manuals such as gcloud's the command is its last word). A sentence
   is kept at most twice, a clipped target three times (generated manuals repeat theirs).
   Licence: that of each package's man page (mostly GPL; the Linux man-pages project's
   own). Written as ``task/options.jsonl``, read by lensray as a local task file
   (``TaskConfig(source=..., template="{input}: ")``): 256 test rows, 64 validation rows
   (unused: no early stopping) and the train pool that nested subsets are drawn from.
3. A **zoo** of 14 candidates (``ZOO``): GPT-2, Llama and OPT configs in three sizes (S, M, L:
   33K-39K, 115K-144K and 358K-462K parameters), each pre-trained here (causal LM on random
   64-character windows, batch 16, AdamW) for 250 to 1500 optimiser steps on one corpus,
   saved with ``save_pretrained`` (model and tokenizer) into ``models/<name>/`` and loaded back
   through the folder-id path every user's candidate takes (``ProbeRunner(<folder>)``).
4. **Probes** through lensray's probe engine (``lensray.engine.probe.ProbeRunner``, no Ray) at
   D = 0, 50, 100, 200, ... ``--target`` (default 12800: the task's train pool holds about 21,800
   rows; starting at 50 leaves 3 points below D*/64, so budgets r = 8 ... 64 of D* can be scored), 2 epochs at learning rate 1e-3, with ``probe.ntk`` on: test loss and the NTK features of
   each probe, one JSON per probe in ``probes/<name>/D<d>.json`` (written atomically); a
   re-run skips every probe, model and file that exists, so a killed run resumes.
5. The **curves table** (``--out``): the columns of ``lensray.core.curves`` (``config name``,
   one loss column per D, ``size``, ``family``), the candidate's ``corpus`` and
   ``pretrain_steps``, and NTK columns (format in docs/INTERFACES.md, "validation zoo"):
   ``ntk_F@<D>`` (F(Θ, t) at that probe's steps and learning rate), ``ntk_t@<D>`` (t, the
   probe's optimiser steps), ``ntk_eta`` (η), ``ntk_trace`` (tr Θ), ``ntk_seconds`` (cost of the
   features), ``ntk_eig_<j>`` and ``ntk_coef_<j>`` (the spectrum λ_j and Vᵀr₀, so that
   F(t) = Σ_j exp(−2ηλ_j t) coef_j² can be evaluated at any t). Only candidates with every
   probe done are written.

    nice -n 19 python benchmarks/validation_zoo.py --work runs/validation-zoo \\
        --out benchmarks/data/validation_zoo.csv
    lensray benchmark --curves benchmarks/data/validation_zoo.csv --target 12800 --ratios 2,4,8,16 \\
        --out runs/bench-vz

One CPU thread (``torch.set_num_threads(1)``); a smaller zoo for a smoke run:
``--only NAME,NAME --target 800 --pretrain-scale 0.1 --test-size 64``.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lensray.core.curves import FAMILY_COLUMN, ID_COLUMN, SIZE_COLUMN

CORPORA = ("licences", "pydoc", "changelogs")
SEQ_LEN = 64
"""Characters per pre-training window (tokens: the tokenizer is character-level)."""
PROMPT_CHARS, TARGET_CHARS = 36, 52
"""Longest prompt and target of the downstream task, cut at a word boundary."""

SIZES: dict[str, dict[str, int]] = {
    "S": {"d": 32, "layers": 2, "heads": 2},
    "M": {"d": 64, "layers": 2, "heads": 4},
    "L": {"d": 96, "layers": 3, "heads": 4},
}


@dataclass(frozen=True)
class Spec:
    """One candidate: architecture family and size, pre-training corpus, steps and seed."""

    family: str
    size: str
    corpus: str
    steps: int
    seed: int = 0
    tag: str = ""

    @property
    def name(self) -> str:
        return f"{self.family}-{self.size}{self.tag}-{self.corpus}-{self.steps}"


ZOO: tuple[Spec, ...] = (
    Spec("gpt2", "S", "licences", 1000, 1),
    Spec("gpt2", "M", "pydoc", 500, 2),
    Spec("gpt2", "L", "changelogs", 250, 3),
    Spec("gpt2", "M", "changelogs", 1500, 4, "b"),
    Spec("llama", "S", "pydoc", 250, 5),
    Spec("llama", "M", "licences", 1000, 6),
    Spec("llama", "L", "pydoc", 500, 7),
    Spec("llama", "L", "licences", 1500, 8, "b"),
    Spec("opt", "S", "changelogs", 500, 9),
    Spec("opt", "M", "changelogs", 250, 10),
    Spec("opt", "L", "licences", 1000, 11),
    Spec("opt", "S", "pydoc", 1500, 12, "b"),
    # two more large checkpoints of the family that leads the first twelve, so that its top is contested
    Spec("llama", "L", "pydoc", 1500, 13, "c"),
    Spec("llama", "L", "changelogs", 250, 14, "d"),
)


def grid(target: int, start: int = 200) -> list[int]:
    """D = 0, start, 2 start, 4 start, ... up to ``target`` (which must be start * 2^k)."""
    out, d = [0], start
    while d <= target:
        out.append(d)
        d *= 2
    if out[-1] != target:
        raise SystemExit(f"error: --target {target} is not {start} times a power of 2")
    return out


# --------------------------------------------------------------------------- corpora


def ascii_text(text: str) -> str:
    """NFKD-normalised ASCII with tabs as spaces and trailing spaces dropped."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "\n".join(line.replace("\t", " ").rstrip() for line in text.splitlines())


def _take(parts: Iterable[str], max_chars: int) -> str:
    out, n = [], 0
    for part in parts:
        part = ascii_text(part).strip()
        if not part:
            continue
        out.append(part)
        n += len(part) + 2
        if n >= max_chars:
            break
    return "\n\n".join(out)[:max_chars]


def _shuffled(paths: Iterable[Path], seed: int) -> list[Path]:
    paths = sorted(paths)
    random.Random(seed).shuffle(paths)
    return paths


def _read(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def licences_corpus(max_chars: int, root: Path = Path("/usr/share")) -> str:
    """Licence texts and package copyright files (see the module docstring)."""
    files = sorted(p for p in (root / "common-licenses").glob("*") if p.is_file())
    files += _shuffled((root / "doc").glob("*/copyright"), 1)
    return _take(map(_read, files), max_chars)


def pydoc_corpus(max_chars: int, root: Path | None = None) -> str:
    """Docstrings of the Python standard library (module, class and function docstrings)."""
    root = root or Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")

    def docstrings() -> Iterable[str]:
        for path in _shuffled(root.rglob("*.py"), 2):
            if any(part in ("test", "tests", "idle_test", "site-packages", "dist-packages") for part in path.parts):
                continue
            try:
                tree = ast.parse(_read(path))
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        yield doc

    return _take(docstrings(), max_chars)


def changelogs_corpus(max_chars: int, root: Path = Path("/usr/share/doc")) -> str:
    """Debian package changelogs."""
    return _take(map(_read, _shuffled(root.glob("*/changelog.Debian.gz"), 3)), max_chars)


def load_corpus(name: str, max_chars: int) -> str:
    """One pre-training corpus by name; exits when the machine has too little of it."""
    text = {"licences": licences_corpus, "pydoc": pydoc_corpus, "changelogs": changelogs_corpus}[name](max_chars)
    if len(text) < 20 * SEQ_LEN:
        raise SystemExit(f"error: corpus {name!r}: only {len(text)} characters of text found on this machine")
    return text


# --------------------------------------------------------------------------- downstream task

_ROFF = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\\((aq|cq)"), "'"),
    (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\[&|^%:,/]"), ""),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\."), ""),
]
_FONT_MACROS = (".B ", ".I ", ".BR ", ".IR ", ".BI ", ".RB ", ".RI ", ".IB ")


def roff_text(line: str) -> str:
    """A roff text line without escapes and font macros, spaces collapsed."""
    if line.startswith(_FONT_MACROS):
        line = line.split(" ", 1)[1].replace('"', "")
    for rx, rep in _ROFF:
        line = rx.sub(rep, line)
    return " ".join(line.split())


def _clip(text: str, n: int) -> str:
    """At most ``n`` characters, cut at a word boundary when there is one."""
    if len(text) <= n:
        return text
    cut = text[:n]
    return cut.rsplit(" ", 1)[0] if " " in cut else cut


def man_options(page: str, command: str) -> list[dict[str, str]]:
    """``{"input": "<command> <option>", "target": <first sentence of its description>}`` per option of a man page."""
    lines = page.splitlines()
    rows, i = [], 0
    while i < len(lines):
        if not lines[i].startswith(".TP"):
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].startswith(".") and not lines[j].startswith(_FONT_MACROS):
            j += 1
        if j >= len(lines):
            break
        tag = roff_text(lines[j])
        k, desc = j + 1, []
        while k < len(lines) and not lines[k].startswith("."):
            desc.append(lines[k])
            k += 1
        text = roff_text(" ".join(desc))
        sentence = re.split(r"(?<=[.;:])\s", text, maxsplit=1)[0]
        if tag.startswith("-") and sentence and tag.isascii() and sentence.isascii():
            command = command.split("_")[-1]  # gcloud_compute_instances_create -> create
            prompt = f"{command} {_clip(tag, max(12, PROMPT_CHARS - len(command) - 1))}"
            rows.append({"input": prompt, "target": sentence})
        i = k
    return rows


def man_option_rows(root: Path = Path("/usr/share/man"), sections: Sequence[str] = ("man1", "man8"),
                    max_pages: int | None = None, repeats: int = 2, clipped_repeats: int = 3) -> list[dict[str, str]]:
    """The downstream task's rows from the man pages.

    A description sentence is kept at most ``repeats`` times, and the same clipped target
    (``TARGET_CHARS``) at most ``clipped_repeats`` times: generated manuals repeat theirs.
    """
    seen: dict[str, int] = {}
    rows, pairs = [], set()
    pages = sorted(p for s in sections for p in (root / s).glob("*.gz"))[:max_pages]
    for path in pages:
        page = _read(path)
        if page.startswith(".so"):
            continue
        for row in man_options(page, path.name.split(".")[0]):
            target = _clip(row["target"], TARGET_CHARS)
            key = (row["input"], target)
            if key in pairs or seen.get(row["target"], 0) >= repeats or seen.get(target, 0) >= clipped_repeats:
                continue
            pairs.add(key)
            seen[row["target"]] = seen.get(row["target"], 0) + 1
            if target != row["target"]:
                seen[target] = seen.get(target, 0) + 1
            rows.append({"input": row["input"], "target": target})
    return rows


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    _atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- candidates


def model_config(family: str, size: str, tokenizer: Any) -> Any:
    """The transformers config of a candidate (vocabulary and special ids from ``tokenizer``)."""
    import transformers

    s = SIZES[size]
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    d, layers, heads = s["d"], s["layers"], s["heads"]
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=d, n_layer=layers, n_head=heads, n_positions=128, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=heads,
                                        max_position_embeddings=128, **ids)
    if family == "opt":
        return transformers.OPTConfig(hidden_size=d, ffn_dim=4 * d, num_hidden_layers=layers,
                                      num_attention_heads=heads, max_position_embeddings=128,
                                      word_embed_proj_dim=d, dropout=0.0, attention_dropout=0.0, **ids)
    raise ValueError(f"unknown family {family!r}")


def pretrain(model: Any, tokenizer: Any, text: str, steps: int, seed: int, batch: int = 16,
             learning_rate: float = 2e-3) -> float:
    """Causal-LM pre-training on random ``SEQ_LEN`` windows of ``text``; returns the last 50 steps' mean loss."""
    import torch

    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)
    losses = []
    model.train()
    for step in range(steps):
        lr = learning_rate * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        start = torch.randint(0, len(ids) - SEQ_LEN - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + SEQ_LEN] for s in start.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return float(np.mean(losses[-50:])) if losses else math.nan


def build_candidate(spec: Spec, corpus: str, folder: Path) -> dict[str, Any]:
    """Pre-train ``spec`` on ``corpus`` and ``save_pretrained`` it into ``folder`` (skipped when there)."""
    import torch
    import transformers

    from lensray.engine.models import char_tokenizer

    meta = folder / "zoo.json"
    if meta.is_file() and (folder / "model.safetensors").is_file():
        return json.loads(meta.read_text())
    tokenizer = char_tokenizer()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = transformers.AutoModelForCausalLM.from_config(model_config(spec.family, spec.size, tokenizer))
        loss = pretrain(model, tokenizer, corpus, spec.steps, spec.seed)
    info = {"name": spec.name, "family": spec.family, "size": spec.size, "corpus": spec.corpus,
            "pretrain_steps": spec.steps, "seed": spec.seed, "pretrain_loss": loss,
            "n_params": int(sum(p.numel() for p in model.parameters())),
            "pretrain_seconds": time.perf_counter() - start}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "zoo.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return info


# --------------------------------------------------------------------------- probes


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def probe_path(work: Path, name: str, d: int) -> Path:
    return work / "probes" / name / f"D{d}.json"


def run_probes(name: str, folder: Path, sizes: Sequence[int], work: Path, task: Any, task_data: Any,
               probe: Any, log: Any = print) -> list[dict[str, Any]]:
    """Probe the candidate in ``folder`` at every D in ``sizes`` not yet persisted; returns all its probes."""
    from lensray.engine.probe import ProbeRunner

    todo = [d for d in sizes if not probe_path(work, name, d).is_file()]
    runner = ProbeRunner(str(folder), task, probe, task_data=task_data) if todo else None
    for d in todo:
        res = runner.run(d).to_dict()
        res["model"] = name
        _atomic_write(probe_path(work, name, d), json.dumps(res, indent=1))
        ntk = res.get("ntk") or {}
        loss = f"{res['test_loss']:.4f}" if res["test_loss"] is not None else res["status"]
        log(f"  {name} D={d}: loss {loss}  F {ntk.get('F', math.nan):.4g}  steps {res['steps']}  "
            f"{res['wall_seconds']:.1f} s", flush=True)
    return [json.loads(probe_path(work, name, d).read_text()) for d in sizes]


# --------------------------------------------------------------------------- table


def curves_rows(candidates: list[dict[str, Any]], sizes: Sequence[int]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the curves table (format in the module docstring).

    ``candidates``: per candidate, its ``info`` (``build_candidate``) and ``probes`` (one dict
    per D in ``sizes``, all ``ok``).
    """
    n_eig = max(len((p.get("ntk") or {}).get("eigenvalues", [])) for c in candidates for p in c["probes"])
    header = [ID_COLUMN, *map(str, sizes), SIZE_COLUMN, FAMILY_COLUMN, "corpus", "pretrain_steps",
              *(f"ntk_F@{d}" for d in sizes), *(f"ntk_t@{d}" for d in sizes), "ntk_eta", "ntk_trace",
              "ntk_seconds", *(f"ntk_eig_{j + 1}" for j in range(n_eig)), *(f"ntk_coef_{j + 1}" for j in range(n_eig))]
    rows = []
    for c in candidates:
        info, probes = c["info"], c["probes"]
        ntks = [p.get("ntk") or {} for p in probes]
        first = ntks[0]
        spectrum = [*first.get("eigenvalues", []), *[""] * (n_eig - len(first.get("eigenvalues", [])))]
        coefs = [*first.get("coefficients", []), *[""] * (n_eig - len(first.get("coefficients", [])))]
        rows.append([info["name"], *(_g(p["test_loss"]) for p in probes), info["n_params"], info["family"],
                     info["corpus"], info["pretrain_steps"], *(_g(n.get("F")) for n in ntks),
                     *(p["steps"] for p in probes), _g(first.get("learning_rate")), _g(first.get("trace")),
                     _g(first.get("seconds")), *map(_g, spectrum), *map(_g, coefs)])
    return header, rows


def _g(x: Any) -> str:
    return "" if x is None or x == "" else f"{float(x):.6g}"


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    _atomic_write(path, buf.getvalue())


def ranking_change(losses: np.ndarray, ids: list[str], sizes: Sequence[int]) -> dict[str, Any]:
    """Spearman correlation of each D's ranking with the ranking at the largest D, and the best model at each D."""
    from scipy.stats import spearmanr

    best = {str(d): ids[int(np.argmin(losses[:, j]))] for j, d in enumerate(sizes)}
    rho = {str(d): float(spearmanr(losses[:, j], losses[:, -1])[0]) for j, d in enumerate(sizes)}
    return {"best": best, "spearman_vs_target": rho}


def ntk_columns(path: Path, prefix: str = "ntk_F@") -> tuple[list[int], np.ndarray]:
    """The D of every ``<prefix><D>`` column of a curves table and their values (n, m); NaN where empty."""
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    cols = [(j, int(h[len(prefix):])) for j, h in enumerate(rows[0]) if h.startswith(prefix)]
    values = np.array([[float(r[j]) if r[j].strip() else np.nan for j, _ in cols] for r in rows[1:]])
    return [d for _, d in cols], values.reshape(len(rows) - 1, len(cols))


def fit_rmse(path: Path) -> dict[str, dict[str, float]]:
    """In-sample log-space RMSE of the rectified law and the LensLLM law (F from the NTK per point,
    F from the NTK per curve (F at D = 0), F free) on every curve of a validation-zoo table."""
    from lensray.core.curves import load_curves_csv
    from lensray.core.laws import get_law

    curves = load_curves_csv(path)
    d_ntk, F = ntk_columns(path)
    if d_ntk != [int(d) for d in curves.D]:
        raise SystemExit(f"error: {path}: the ntk_F@<D> columns {d_ntk} do not match the loss columns")
    fits = {"rectified": get_law("rectified").fit(curves.D, curves.L),
            "lensllm, NTK F per point": get_law("lensllm").fit(curves.D, curves.L, F=F),
            "lensllm, NTK F per curve (D = 0)": get_law("lensllm").fit(curves.D, curves.L, F=F[:, 0]),
            "lensllm, F free": get_law("lensllm").fit(curves.D, curves.L)}
    return {name: {"mean": float(np.nanmean(law.rmse_)), "median": float(np.nanmedian(law.rmse_)),
                   "max": float(np.nanmax(law.rmse_)), "n_fitted": int(np.sum(law.fitted_))}
            for name, law in fits.items()}


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/validation-zoo", help="folder of corpora, task, models and probes")
    p.add_argument("--out", default="benchmarks/data/validation_zoo.csv", help="curves table to write")
    p.add_argument("--target", type=int, default=12800, help="D*, the largest probe (--start times a power of 2)")
    p.add_argument("--start", type=int, default=50, help="smallest D > 0")
    p.add_argument("--only", default=None, help="comma-separated candidate names (default: the whole zoo)")
    p.add_argument("--pretrain-scale", type=float, default=1.0, help="multiply every candidate's pre-training steps")
    p.add_argument("--epochs", type=float, default=2.0, help="probe epochs")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="probe peak learning rate")
    p.add_argument("--test-size", type=int, default=256, help="held-out test rows of the task")
    p.add_argument("--corpus-chars", type=int, default=3_000_000, help="characters read per corpus")
    p.add_argument("--max-pages", type=int, default=None, help="read at most this many man pages (tests)")
    p.add_argument("--fit-report", action="store_true", help="only print the laws' in-sample RMSE on --out")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from lensray.engine.data import TaskConfig, load_task
    from lensray.engine.probe import ProbeConfig

    args = parse_args(argv)
    if args.fit_report:
        for name, r in fit_rmse(Path(args.out)).items():
            print(f"{name:>34}: RMSE mean {r['mean']:.4f}  median {r['median']:.4f}  max {r['max']:.4f}  "
                  f"({r['n_fitted']} fitted)")
        return 0
    torch.set_num_threads(1)
    work = Path(args.work)
    sizes = grid(args.target, args.start)
    t0 = time.perf_counter()
    specs = list(ZOO)
    if args.pretrain_scale != 1.0:
        specs = [Spec(s.family, s.size, s.corpus, max(1, round(s.steps * args.pretrain_scale)), s.seed, s.tag)
                 for s in specs]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        unknown = sorted(set(wanted) - {s.name for s in specs})
        if unknown:
            raise SystemExit(f"error: --only: unknown candidate(s) {unknown}; known: {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in wanted]

    task_file = work / "task" / "options.jsonl"
    if not task_file.is_file():
        rows = man_option_rows(max_pages=args.max_pages)
        write_jsonl(rows, task_file)
        print(f"task: {len(rows)} option/description pairs from the man pages -> {task_file}", flush=True)
    task = TaskConfig(source=str(task_file), template="{input}: ", max_length=96, test_size=args.test_size,
                      validation_size=64, max_rows=None)
    task_data = load_task(task)
    print(f"task: {task_data.summary()}", flush=True)
    if len(task_data.train) < args.target:
        raise SystemExit(f"error: the task's train pool has {len(task_data.train)} rows, fewer than --target")
    probe = ProbeConfig(learning_rate=args.learning_rate, epochs=args.epochs, micro_batch=16, device="cpu",
                        cpu_threads=1, ntk=True, ntk_samples=32, bf16=False, seed=0)

    corpora: dict[str, str] = {}
    done: list[dict[str, Any]] = []
    for k, spec in enumerate(specs):
        folder = work / "models" / spec.name
        if not (folder / "zoo.json").is_file() and spec.corpus not in corpora:
            corpus_file = work / "corpora" / f"{spec.corpus}.txt"
            if not corpus_file.is_file():
                _atomic_write(corpus_file, load_corpus(spec.corpus, args.corpus_chars))
            corpora[spec.corpus] = corpus_file.read_text()
        info = build_candidate(spec, corpora.get(spec.corpus, ""), folder)
        print(f"[{k + 1}/{len(specs)}] {spec.name}: {info['n_params']} parameters, pre-training loss "
              f"{info['pretrain_loss']:.3f} ({info['pretrain_seconds']:.0f} s); elapsed "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        probes = run_probes(spec.name, folder, sizes, work, task, task_data, probe)
        bad = [p for p in probes if p["status"] != "ok"]
        if bad:
            print(f"  {spec.name}: {len(bad)} probe(s) not ok ({bad[0]['error']}); left out of the table", flush=True)
            continue
        done.append({"info": info, "probes": probes})
        header, rows = curves_rows(done, sizes)
        write_csv(Path(args.out), header, rows)

    if not done:
        raise SystemExit("error: no candidate has a complete curve")
    losses = np.array([[p["test_loss"] for p in c["probes"]] for c in done])
    change = ranking_change(losses, [c["info"]["name"] for c in done], sizes)
    ntk_seconds = [c["probes"][0]["ntk"]["seconds"] for c in done]
    summary = {"candidates": len(done), "sizes": sizes, "wall_seconds": time.perf_counter() - t0,
               "ntk_seconds_per_candidate": float(np.mean(ntk_seconds)), **change}
    _atomic_write(work / "summary.json", json.dumps(summary, indent=1))
    print(f"wrote {args.out}: {len(done)} candidates x {len(sizes)} sizes; elapsed {summary['wall_seconds']:.0f} s")
    print("best per D: " + ", ".join(f"{d}: {m}" for d, m in change["best"].items()))
    print("Spearman vs D*: " + ", ".join(f"{d}: {r:.2f}" for d, r in change["spearman_vs_target"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
