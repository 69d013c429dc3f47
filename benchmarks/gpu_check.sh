#!/usr/bin/env bash
# The GPU check of lensray in one go, on one GPU, in at most 7.5 minutes (GPU_CHECK_BUDGET_S):
#   install   the Python packages lensray needs (carried wheels, or pip into a fresh venv), timed
#   imports   torch, CUDA, the GPU's name, and every package lensray imports
#   tp-125m   benchmarks/probe_throughput.py, gpt2-125m preset, bf16, sequence 512: tokens/s, MFU
#   tp-1b     the same on the llama-1b preset (1.1B)
#   oom       benchmarks/oom_recovery.py: llama-1b with micro-batch 1024 (far too large); the probe
#             halves it until it fits and finishes; the record says so
#   ntk       benchmarks/ntk_cost.py: NTK features of gpt2-125m at the default sketch size: time, peak memory
#   screen    benchmarks/gpu_screen.py configs/gpu-check.yaml: a real screening of four models
#             (85M-969M) with local Ray, half a GPU per candidate; wall time, GPU share (with
#             nvidia-smi's utilisation sampled every second)
#
# Usage: bash benchmarks/gpu_check.sh [options] [OUTDIR]      (OUTDIR: default $OUT, else runs/gpu-check)
#   --cpu-dry-run   every step on the CPU at tiny sizes (no install unless --wheels or --pip-install)
#   --skip-install  use the Python as found (LENSRAY_PYTHON, else python3)
#   --wheels DIR    install the wheels and ray tarball of DIR (benchmarks/gpu_wheels.sh) into a
#                   target folder, offline; the default when .whl/ exists
#   --only LIST     run only these steps (comma-separated, e.g. tp-1b,screen: a rerun of what failed);
#                   install and imports always run
#   --pip-install   create a fresh venv and pip install torch==2.13.0 (from the default index: the
#                   CUDA wheel on Linux) and then `pip install -e .`; needs a package registry
#                   (a machine without one fails this step in seconds and goes on with python3)
# Environment: LENSRAY_PYTHON (an existing environment's python: no install), GPU_CHECK_BUDGET_S
# (the whole script's time, default 450), GPU_CHECK_WORK (work folder, default
# /tmp/lensray-gpu-check), GPU_PEAK_TFLOPS (the chip's peak for the MFU instead of the table in
# probe_throughput.py), LENSRAY_CACHE (tiny models, default /tmp/lensray-gpu-cache).
#
# Every step runs under `timeout` within the budget left, and one failing step does not stop the
# others. OUTDIR receives four files: summary.json and summary.md (each step's exit status, time
# and figures), gpu_check.log (every step's output) and work.tar.gz (logs, figures, the screening's
# outputs). The table is printed at the end; the exit status is 1 when a step failed, timed out or found no time left.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHECKS="tp-125m tp-1b oom ntk screen"
ONLY=
DRY=0
INSTALL=auto
WHEELS=
OUTDIR=
while (($#)); do
    case $1 in
        --cpu-dry-run) DRY=1 ;;
        --skip-install) INSTALL=skip ;;
        --pip-install) INSTALL=pip ;;
        --wheels) INSTALL=wheels; WHEELS=${2:?--wheels needs a folder}; shift ;;
        --only) ONLY=${2:?--only needs a list of steps}; shift
                for s in ${ONLY//,/ }; do
                    [[ " $CHECKS " == *" $s "* ]] || { echo "error: --only: unknown step '$s' (steps: $CHECKS)" >&2; exit 2; }
                done ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; exit 2 ;;
        *) OUTDIR=$1 ;;
    esac
    shift
done
OUTDIR=${OUTDIR:-${OUT:-runs/gpu-check}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=${GPU_CHECK_WORK:-/tmp/lensray-gpu-check}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
SITE=$WORK/site
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$WORK/figures"
STEPS=$WORK/steps.tsv
: > "$STEPS"
T0=$SECONDS

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1 RAY_USAGE_STATS_ENABLED=0
# Ray's memory monitor reads the machine's memory total, which on a machine whose memory grows as
# it is used starts far below what it can use; the check keeps it from killing workers on that
export RAY_memory_monitor_refresh_ms=0
export LENSRAY_CACHE=${LENSRAY_CACHE:-/tmp/lensray-gpu-cache}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
PY=${LENSRAY_PYTHON:-python3}
[[ -n ${LENSRAY_PYTHON:-} && $INSTALL == auto ]] && INSTALL=skip
if [[ $INSTALL == auto ]]; then
    if ((DRY)); then INSTALL=skip
    elif [[ -d $REPO/.whl ]]; then INSTALL=wheels; WHEELS=$REPO/.whl
    else INSTALL=pip
    fi
fi
[[ -n $WHEELS ]] && WHEELS=$(cd "$WHEELS" && pwd)

# record NAME RC SECONDS LIMIT STATUS: one line of steps.tsv
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STEPS"; }

# step NAME LIMIT_S CMD...: run CMD under timeout within the budget left; stdout to logs/NAME.out
# (its last line, when JSON, is the step's figures), stderr to logs/NAME.err
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n $ONLY && " $CHECKS " == *" $name "* && ",$ONLY," != *",$name,"* ]]; then
        return 0
    fi
    local left=$((BUDGET - (SECONDS - T0) - 15))
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "== $name: skipped, $((SECONDS - T0)) s of the ${BUDGET} s budget spent"
        record "$name" - 0 0 "skipped (no time left)"
        return 0
    fi
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS rc=0
    if [[ $(type -t "$1") == function ]]; then set -- bash -ec '"$@"' "$name" "$@"; fi  # timeout runs programs
    timeout -k 10 "$limit" "$@" > "$WORK/logs/$name.out" 2> "$WORK/logs/$name.err" || rc=$?
    local took=$((SECONDS - start)) status=ok
    ((rc == 124 || rc == 137)) && status="timed out"
    ((rc != 0 && rc != 124 && rc != 137)) && status=failed
    tail -n 1 "$WORK/logs/$name.out" > "$WORK/figures/$name.json" 2>/dev/null || true
    record "$name" "$rc" "$took" "$limit" "$status"
    echo "   $status (rc $rc) in ${took} s"
    ((rc == 0)) || tail -n 5 "$WORK/logs/$name.err" | sed 's/^/   | /'
    write_summary > /dev/null || true
    return 0
}

install_wheels() {  # the carried wheels and ray tarball into $SITE, offline
    mkdir -p "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    local tarball
    for tarball in "$WHEELS"/*.tar.xz; do
        [[ -e $tarball ]] || continue
        "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' "$tarball" "$SITE"
    done
    echo "{\"mode\": \"wheels\", \"from\": \"$WHEELS\", \"into\": \"$SITE\"}"
}

install_pip() {  # a fresh venv with the default index's torch (CUDA on Linux), then the project
    local venv=$WORK/venv
    "$PY" -m venv "$venv"
    "$venv/bin/pip" install -q --no-cache-dir --timeout 15 --retries 1 torch==2.13.0
    "$venv/bin/pip" install -q --no-cache-dir --timeout 15 --retries 1 -e "$REPO"
    echo "{\"mode\": \"pip\", \"venv\": \"$venv\"}"
}

check_imports() {
    "$PY" - <<'PY'
import json, platform
import torch, transformers, pydantic, ray, yaml, scipy, pyarrow, matplotlib, rich
import lensray.run.screen, lensray.engine.probe  # noqa: F401
cuda = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name() if cuda else None, "cuda_available": cuda,
                  "transformers": transformers.__version__, "ray": ray.__version__, "pydantic": pydantic.__version__}))
PY
}

export -f install_wheels install_pip check_imports
export PY SITE WHEELS WORK REPO

write_summary() {
    python3 - "$WORK" "$OUTDIR" "$DRY" "$BUDGET" <<'PY'
import json, sys
from pathlib import Path

work, outdir, dry, budget = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
KEYS = {  # figures shown in the table, per step (every figure is in summary.json)
    "install": ["mode"], "imports": ["gpu", "torch", "cuda", "ray"],
    "tp-125m": ["n_params", "tokens_per_s", "mfu", "peak_tflops_per_s", "peak_memory_gib"],
    "tp-1b": ["n_params", "tokens_per_s", "mfu", "peak_tflops_per_s", "peak_memory_gib"],
    "oom": ["recovered", "requested_micro_batch", "micro_batch", "grad_accum", "halvings", "status", "wall_seconds"],
    "ntk": ["n_params", "seconds", "plain_backward_seconds", "peak_memory_gib", "extra_memory_gib", "sketch_dim"],
    "screen": ["selected", "failed", "screen_wall_seconds", "gpu_seconds", "gpu_share", "gpu_util_mean", "build_seconds"],
}
steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, seconds, limit, status = line.split("\t")
    figures = {}
    path = work / "figures" / f"{name}.json"
    try:
        figures = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    if not isinstance(figures, dict):
        figures = {}
    util = work / "gpu-util.csv"
    if name == "screen" and util.is_file():
        vals = [float(r.split(",")[1]) for r in util.read_text().splitlines() if r.count(",") >= 2
                and r.split(",")[1].strip().replace(".", "", 1).isdigit()]
        if vals:
            figures["gpu_util_mean"] = round(sum(vals) / len(vals), 1)
            figures["gpu_util_samples"] = len(vals)
    steps.append({"step": name, "status": status, "rc": None if rc == "-" else int(rc), "seconds": int(seconds),
                  "limit_s": int(limit), "figures": figures})
summary = {"mode": "cpu dry run (tiny sizes)" if dry else "gpu", "budget_s": budget, "steps": steps}
(outdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
lines = [f"# GPU check ({summary['mode']})", "", "| step | status | rc | seconds | limit | figures |",
         "|---|---|---|---|---|---|"]
for s in steps:
    fig = ", ".join(f"{k} {s['figures'][k]}" for k in KEYS.get(s["step"], []) if k in s["figures"])
    lines.append(f"| {s['step']} | {s['status']} | {'-' if s['rc'] is None else s['rc']} | {s['seconds']} | "
                 f"{s['limit_s']} | {fig} |")
(outdir / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
}

if ((DRY)); then
    DEV=(--device cpu --tiny)
    TP=(--no-bf16 --seq-len 64 --micro-batch 4 --steps 2 --warmup-steps 1 --threads 1)
    OOM=(--no-bf16 --seq-len 32 --micro-batch 64 --inject-oom-above 8)
    NTK=(--seq-len 32 --samples 8 --threads 1)
    SCREEN=(--tiny)
else
    DEV=(--device cuda)
    TP=(--seq-len 512 --micro-batch 32 --steps 20 --warmup-steps 3 ${GPU_PEAK_TFLOPS:+--peak-tflops "$GPU_PEAK_TFLOPS"})
    OOM=(--seq-len 512 --micro-batch 1024)
    NTK=(--seq-len 512)
    SCREEN=()
fi

echo "lensray GPU check: $( ((DRY)) && echo 'CPU dry run' || echo GPU), budget ${BUDGET} s, work $WORK, out $OUTDIR"
case $INSTALL in
    wheels) step install 120 install_wheels && export PYTHONPATH=$SITE:$PYTHONPATH ;;
    pip) step install 240 install_pip
         if [[ -x $WORK/venv/bin/python ]] && "$WORK/venv/bin/python" -c 'import torch, lensray' 2>/dev/null; then
             PY=$WORK/venv/bin/python
         fi ;;
    skip) record install 0 0 0 "skipped" ;;
esac
{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } > "$WORK/logs/nvidia-smi.txt" 2>&1 || true
step imports 60 check_imports

cd "$REPO"
step tp-125m 90 "$PY" benchmarks/probe_throughput.py --model gpt2-125m "${DEV[@]}" "${TP[@]}" --json
step tp-1b 120 "$PY" benchmarks/probe_throughput.py --model llama-1b "${DEV[@]}" "${TP[@]}" --json
step oom 120 "$PY" benchmarks/oom_recovery.py --model llama-1b "${DEV[@]}" "${OOM[@]}" --json
step ntk 90 "$PY" benchmarks/ntk_cost.py --model gpt2-125m "${DEV[@]}" "${NTK[@]}" --json
UTIL_PID=
if command -v nvidia-smi > /dev/null && ! ((DRY)); then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 \
        > "$WORK/gpu-util.csv" 2>/dev/null &
    UTIL_PID=$!
fi
step screen 330 "$PY" benchmarks/gpu_screen.py configs/gpu-check.yaml --out "$WORK/screen" "${SCREEN[@]}" --json
[[ -n $UTIL_PID ]] && kill "$UTIL_PID" 2>/dev/null || true

for f in "$WORK"/logs/*; do printf '\n===== %s\n' "${f##*/}"; cat "$f"; done > "$OUTDIR/gpu_check.log"
tar -C "$WORK" --exclude=site --exclude=venv --exclude=screen/tune -czf "$OUTDIR/work.tar.gz" . 2>/dev/null || true
echo
write_summary
echo "total $((SECONDS - T0)) s; summary in $OUTDIR/summary.md and summary.json"
# exit status: 0 when every selected step ran and succeeded, else 1 (the summary names the steps)
! cut -f5 "$STEPS" | grep -qE '^(failed|timed out|skipped \(no time left\))$'
