#!/usr/bin/env bash
# Fetch, on a machine with package-registry access, the Python packages that lensray needs and that a
# GPU machine image without registry access lacks, so that they can travel with the working tree
# (64 MiB in all) to be installed there offline by benchmarks/gpu_check.sh (--wheels DIR).
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default DIR: .whl (ignored by git)
#
# The target image is assumed to hold Python 3.12 with torch, transformers, numpy, scipy, pyarrow,
# pandas, matplotlib, rich, pyyaml, safetensors, accelerate and the other common packages, but not
# pydantic, ray or jsonschema. Wheels are fetched for CPython 3.12 on manylinux x86-64
# (PYVER=3.11 etc. to change). Ray's wheel (about 80 MB) is larger than what can travel; it is
# unpacked and repacked as a tar.xz without ray/jars (the Java workers, unused here): about 28 MB.
set -euo pipefail

DIR=${1:-.whl}
PYVER=${PYVER:-3.12}
TAG=cp${PYVER/./}
RAY_VERSION=${RAY_VERSION:-2.60.0}
PACKAGES=(
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
    rpds-py==2026.9.1
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PY=${PYTHON:-python3}

mkdir -p "$DIR"
download() {  # download DEST PACKAGE...
    local dest=$1
    shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${PLATFORMS[@]}" -d "$dest" "$@"
}
download "$DIR" "${PACKAGES[@]}"

RAY_TAR="$DIR/ray-$RAY_VERSION-$TAG-nojars.tar.xz"
if [[ ! -s $RAY_TAR ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    download "$tmp" "ray==$RAY_VERSION"
    mkdir "$tmp/site"
    unzip -q "$tmp"/ray-*.whl -d "$tmp/site"  # unzip keeps the executable bits (raylet, gcs_server)
    [[ -x $tmp/site/ray/core/src/ray/gcs/gcs_server ]] || { echo "error: ray's gcs_server lost its exec bit" >&2; exit 1; }
    tar -C "$tmp/site" --exclude=ray/jars -cf - . | xz -T0 -9 > "$RAY_TAR.part"
    mv "$RAY_TAR.part" "$RAY_TAR"
fi

ls -l "$DIR"
total=$(du -cb "$DIR"/* | tail -1 | cut -f1)
echo "total: $((total / 1024 / 1024)) MiB in $DIR (what travels: at most 64 MiB with the working tree)"
