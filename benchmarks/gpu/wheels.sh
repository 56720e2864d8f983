#!/usr/bin/env bash
# Run on a CPU machine with PyPI access before a GPU window: downloads into the git-ignored .whl/ the Python 3.12
# manylinux wheels of what benchmarks/gpu/run.sh needs and the GPU machine lacks, and writes .whl/carried.txt: each
# wheel, best first, with its own requirements on packages the GPU machine already has (huggingface-hub,
# safetensors: read from the wheel's metadata, e.g. diffusers 0.42 needs huggingface-hub >= 1.32 and safetensors
# >= 0.8). run.sh installs the first wheel whose requirements the machine meets. Carry .whl/ with the checkout.
#
# The GPU machine has Python 3.12, torch (CUDA), CuPy, onnx, onnxruntime (CPU), transformers (so huggingface-hub,
# filelock, regex, requests, safetensors, numpy, packaging), scipy, scikit-image (so Pillow) and pytest; it lacks
# diffusers (the VAE classes of every model the GPU path builds). --no-deps: every dependency is named here, nothing
# else is pulled in. diffusers' own importlib_metadata requirement is for old Pythons: it imports without it on
# 3.12. Not carried: tensorrt (over 1 GB; the TensorRT steps skip), av (not on the GPU path), polygraphy and
# onnx-graphsurgeon (export only).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.whl
LIMIT_MIB=60
CANDIDATES=(diffusers==0.42.1 diffusers==0.35.2)  # best first
CHECKED="huggingface-hub safetensors"             # what the GPU machine has and a candidate may need newer
PY=$(command -v python3 || command -v python)

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
: >"$DEST.tmp/carried.txt"
for requirement in "${CANDIDATES[@]}"; do
  pip download --quiet --only-binary :all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --no-deps -d "$DEST.tmp/$requirement" "$requirement"
  wheel=$(ls "$DEST.tmp/$requirement")
  mv "$DEST.tmp/$requirement/$wheel" "$DEST.tmp/" && rmdir "$DEST.tmp/$requirement"
  needs=$("$PY" - "$DEST.tmp/$wheel" $CHECKED <<'EOF'
import re, sys, zipfile
wheel, names = sys.argv[1], {n.lower() for n in sys.argv[2:]}
with zipfile.ZipFile(wheel) as z:
    metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
needs = []
for line in metadata.splitlines():
    if line.startswith("Requires-Dist:") and "extra ==" not in line:
        requirement = line.split(":", 1)[1].split(";")[0].strip()
        if re.split(r"[<>=!~ (\[]", requirement, 1)[0].lower().replace("_", "-") in names:
            needs.append(requirement.replace(" ", ""))
print("; ".join(needs))
EOF
  )
  echo "$wheel needs: ${needs:-nothing it checks}"
  printf '%s\t%s\n' "$wheel" "$needs" >>"$DEST.tmp/carried.txt"
done

total=$(du -sb "$DEST.tmp" | cut -f1)
if ((total > LIMIT_MIB * 1024 * 1024)); then
  echo "wheels.sh: $((total / 1024 / 1024)) MiB is over the ${LIMIT_MIB} MiB the window may carry" >&2
  exit 1
fi
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
ls -l "$DEST"
echo "$DEST: $(awk "BEGIN {printf \"%.1f\", $total / 1048576}") MiB; carry it: run(command=\"bash benchmarks/gpu/run.sh\", carry=[\"$DEST\"])"
