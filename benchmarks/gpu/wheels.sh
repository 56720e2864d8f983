#!/usr/bin/env bash
# Run on a CPU machine with PyPI access before a GPU window (issue 13): downloads into the git-ignored .whl/ the
# Python 3.12 manylinux wheels of what benchmarks/gpu/run.sh needs and the GPU machine lacks, and writes
# .whl/carried.txt (each wheel with the condition under which run.sh installs it). Carry .whl/ with the checkout.
#
# The GPU machine has Python 3.12, torch (CUDA), CuPy, onnx, onnxruntime (CPU), transformers (so huggingface-hub,
# filelock, regex, requests, safetensors, numpy), scipy, scikit-image (so Pillow) and pytest; it lacks diffusers
# (the VAE classes of every model the GPU path builds). --no-deps: every dependency is named here, nothing else is
# pulled in. diffusers' own importlib_metadata requirement is for old Pythons: it imports without it on 3.12.
# Two diffusers releases: the GPU machine's huggingface-hub decides which one installs (diffusers 0.42 needs hub
# >= 1.32, 0.35 works with the hub 0.x of transformers 4.x). Not carried: tensorrt (over 1 GB; the TensorRT steps
# skip), av (not on the GPU path), polygraphy and onnx-graphsurgeon (export only).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.whl
LIMIT_MIB=60
# wheel requirement <TAB> condition on `hub`, the GPU machine's huggingface-hub major version
CARRIED=$'diffusers==0.42.1\thub >= 1\ndiffusers==0.35.2\thub < 1'

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
: >"$DEST.tmp/carried.txt"
while IFS=$'\t' read -r requirement condition; do
  pip download --quiet --only-binary :all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --no-deps -d "$DEST.tmp/$requirement" "$requirement"
  wheel=$(ls "$DEST.tmp/$requirement")
  mv "$DEST.tmp/$requirement/$wheel" "$DEST.tmp/" && rmdir "$DEST.tmp/$requirement"
  printf '%s\t%s\n' "$wheel" "$condition" >>"$DEST.tmp/carried.txt"
done <<<"$CARRIED"

total=$(du -sb "$DEST.tmp" | cut -f1)
if ((total > LIMIT_MIB * 1024 * 1024)); then
  echo "wheels.sh: $((total / 1024 / 1024)) MiB is over the ${LIMIT_MIB} MiB the window may carry" >&2
  exit 1
fi
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
ls -l "$DEST"
echo "$DEST: $(awk "BEGIN {printf \"%.1f\", $total / 1048576}") MiB; carry it: run(command=\"bash benchmarks/gpu/run.sh\", carry=[\"$DEST\"])"
