#!/usr/bin/env bash
# Wheels that bench/perf_bench.py needs on a GPU machine without a package index, downloaded here into DIR (default
# runs/wheels, ignored by git): the project's pins from requirements.txt of the packages such a machine's image lacks
# or has in other versions, plus the optional liger-kernel. Its image is assumed to bring torch (CUDA), triton,
# tokenizers, huggingface-hub, accelerate, safetensors, numpy, scipy, pillow, opencv, pyyaml and tqdm.
#   bash bench/gpu_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-runs/wheels}
pins=$(grep -E '^(transformers|peft|monai|positional-encodings|pydicom|nibabel)==' requirements.txt)
mkdir -p "$dir"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" $pins liger-kernel==0.8.5
# Published as a source archive only; pure Python, so a wheel built here runs anywhere.
python -m pip wheel -q --no-deps -w "$dir" "$(grep -E '^dynamic-network-architectures==' requirements.txt)"
ls "$dir"
