#!/usr/bin/env bash
# The one command of a GPU window; benchmarks/gpu/README.md says how to run it, what to commit, and what the
# rehearsal cannot cover.
#
#   bash benchmarks/gpu/run.sh              # on the GPU machine, at most 450 s; results in $OUT
#   bash benchmarks/gpu/run.sh --rehearse   # the same steps on the CPU at tiny sizes (CI: tests/test_gpu_script.py)
#
# Steps in the order of their value, each under `timeout` and inside one overall budget: carried wheels into a
# private folder, environment (nvidia-smi, versions), latency of torch-fp16 and torch-fast (full size), the fp32
# reference reduced to what parity needs, GPU tests, DCT kernel benchmark, torch-fast-compile (the CFG stages: one
# Inductor compile), CMake kernel build + ctest. A step that runs out of time is "not finished", not a failure; a
# step that cannot run without a GPU reports "skipped: no GPU" in the rehearsal, which runs DCTInit through the CUDA
# kernel executed on the CPU (kernels/cuda_on_cpu.py) behind the kernels' precondition checks. The summary table is
# printed last. Files in $OUT (a temporary folder when unset), at most 8, at most two levels deep: steps.log,
# summary.md, latency-<gpu>.json/.md, dct_kernels-<gpu>.json/.md, compile/latency-<gpu>.json/.md. Exit 0 when no
# step failed (time-outs included), else 1.
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/../.."
export ROOT=$PWD

MODE=gpu
case "${1:-}" in
  --rehearse) MODE=rehearse ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu/run.sh [--rehearse]" >&2; exit 2 ;;
esac

BUDGET=${GPU_WINDOW_SECONDS:-450}  # the whole run, summary included
CAP_SCALE=1                        # per-step limits are sized for the GPU machine's 16 idle cores
RESERVE=10                         # kept back for the summary
export PY=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU machine's torch lives in python3
if [[ $MODE == rehearse ]]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU, even on a GPU machine
  export CINEMO_RT_DCTINIT=cuda-on-cpu  # DCTInit through the CUDA kernel's launcher, executed on the CPU
  # A shared 2-core CI box under load imports torch and diffusers 10x slower than the GPU machine: the rehearsal
  # tests the steps, not their speed, so its limits are wider.
  BUDGET=${GPU_WINDOW_SECONDS:-1200}
  CAP_SCALE=4
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "run.sh: no CUDA GPU visible to $PY; on a CPU machine run: bash benchmarks/gpu/run.sh --rehearse" >&2
  exit 2
fi

export OUT=${OUT:-$(mktemp -d -t gpu-window.XXXXXX)}
mkdir -p "$OUT"
SCRATCH=$(mktemp -d -t gpu-window-scratch.XXXXXX)  # private site-packages, CMake build, step table
trap 'rm -rf "$SCRATCH"' EXIT
export PRIVATE=$SCRATCH/site
export PYTHONPATH=$ROOT:$PRIVATE  # `pip install -e .` is impossible offline: the checkout is imported in place
# The kernels import as cinemo_rt._kernels through a link to kernels/; a copy of the tree may have lost it.
[ -e "$ROOT/cinemo_rt/_kernels" ] || ln -s ../kernels "$ROOT/cinemo_rt/_kernels"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
LOG=$OUT/steps.log
STEPS=$SCRATCH/steps.tsv
: >"$LOG"
: >"$STEPS"
DEADLINE=$((START + BUDGET))
FAILED=0
UNFINISHED=0

seconds_left() { echo $((DEADLINE - $(date +%s) - RESERVE)); }

record() {  # record NAME STATUS SECONDS
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$STEPS"
  printf '=== %s: %s (%s s)\n' "$1" "$2" "$3" | tee -a "$LOG"
}

# step NAME CAP NEED CMD...: run CMD for at most min(CAP, time left) seconds when at least NEED seconds are left;
# STEP_LIMIT holds that limit for CMD. Exit 77 means skipped (the last line of its output says why); 124/137 a
# timeout: "not finished", what the step wrote before stays.
step() {
  local name=$1 cap=$(($2 * CAP_SCALE)) need=$3
  shift 3
  local left
  left=$(seconds_left)
  if ((left < need)); then
    record "$name" "skipped: ${left}s left, the step needs ${need}s" 0
    return
  fi
  local limit=$((cap < left ? cap : left)) t0 rc
  export STEP_LIMIT=$limit
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" >"$SCRATCH/step.out" 2>&1
  rc=$?
  cat "$SCRATCH/step.out" >>"$LOG"
  tail -n 8 "$SCRATCH/step.out"
  local took=$(($(date +%s) - t0)) status
  case $rc in
    0) status=ok ;;
    77) status="skipped: $(tail -n 1 "$SCRATCH/step.out")" ;;
    124 | 137) status="not finished in ${limit}s"; UNFINISHED=1 ;;
    *) status="FAILED (exit $rc; see steps.log)"; FAILED=1 ;;
  esac
  record "$name" "$status" "$took"
}

no_gpu() { record "$1" "skipped: no GPU" 0; }

# -- the steps ----------------------------------------------------------------------------------------------
install_wheels() {
  # .whl/ is written by benchmarks/gpu/wheels.sh; carried.txt lists each wheel with the condition to install it.
  if [[ ! -f .whl/carried.txt ]]; then
    if "$PY" -c "import diffusers" 2>/dev/null; then echo "no .whl/ carried; diffusers is installed here"; exit 77; fi
    echo "no .whl/carried.txt: run benchmarks/gpu/wheels.sh before the window and carry .whl/ with the checkout"
    exit 1
  fi
  local wheels
  wheels=$("$PY" - <<'EOF'
# carried.txt: each wheel with its own requirements on what this machine already has (from the wheel's metadata),
# best first; the first wheel whose requirements all hold is installed.
import importlib.metadata, sys
from packaging.requirements import Requirement  # a dependency of transformers: on the GPU machine

def holds(requirement):
    req = Requirement(requirement)
    try:
        return req.specifier.contains(importlib.metadata.version(req.name), prereleases=True)
    except importlib.metadata.PackageNotFoundError:
        return False

for line in open(".whl/carried.txt"):
    if line.strip() and not line.startswith("#"):
        wheel, requirements = line.rstrip("\n").split("\t")
        needs = [r.strip() for r in requirements.split(";") if r.strip()]
        if all(holds(r) for r in needs):
            print(".whl/" + wheel)
            sys.exit(0)
        print(f"{wheel}: needs {requirements}", file=sys.stderr)
sys.exit("no carried wheel fits this machine's packages (above: what each needs)")
EOF
  ) || exit 1
  echo "installing into $PRIVATE: $wheels"
  "$PY" -m pip install --no-index --no-deps --quiet --target "$PRIVATE" $wheels || exit 1
  "$PY" -c "import diffusers; print('diffusers', diffusers.__version__, 'from', diffusers.__file__)"
}

record_environment() {
  date -u
  uname -a
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "cupy", "diffusers", "transformers", "huggingface_hub", "safetensors", "numpy", "scipy",
             "skimage", "onnx", "onnxruntime", "tensorrt"):
    try:
        module = importlib.import_module(name)
        print(f"{name:16s} {getattr(module, '__version__', '?'):12s} {module.__file__}")
    except Exception as err:  # absent here, or broken: the log says which
        print(f"{name:16s} not importable ({type(err).__name__}: {err})")
import torch
print("torch CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB")
sys.path.insert(0, "benchmarks")
import latency, cinemo_rt.pipeline, cinemo_rt.backends.fast_torch, cinemo_rt._kernels.cupy_dct  # noqa: E401,F401
assert "av" not in sys.modules, "av was imported on the GPU path"
EOF
}

kernel_ctest() {
  if ! command -v cmake >/dev/null || ! command -v nvcc >/dev/null; then echo "no cmake or nvcc on this machine"; exit 77; fi
  cmake -S . -B "$SCRATCH/cmake" -DCMAKE_CUDA_ARCHITECTURES=native >/dev/null &&
    cmake --build "$SCRATCH/cmake" -j "$(nproc)" &&
    ctest --test-dir "$SCRATCH/cmake" --output-on-failure
}
export -f install_wheels record_environment kernel_ctest
export SCRATCH

GPU_TESTS=("$PY" -m pytest -q -rA -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_kernels.py tests/test_tensorrt.py
           tests/test_editing.py tests/test_edit_backends.py)
OUTPUTS=(--out "$OUT" --merge --outputs "$SCRATCH/outputs")
# Each latency run stops starting stages 15 s before its step's limit (they are then "not finished"), so what it
# measured is written; the step's `timeout` is the backstop.
latency() { "$PY" benchmarks/latency.py --budget-s $((STEP_LIMIT - 15)) "$@"; }
export -f latency
if [[ $MODE == gpu ]]; then
  LATENCY=(bash -c 'latency "$@"' latency --repeats 5 --loop-repeats 1 --warmup 1)
  COMPILE_NEEDS=100  # one Inductor compile of the full UNet at the CFG batch: a minute or two
  COMPILE_ARGS=(--cfg-stages-only --no-profile)
else
  LATENCY=(bash -c 'latency "$@"' latency --tiny --steps 2 --repeats 1 --loop-repeats 1 --warmup 1 --long-warmup 0)
  COMPILE_NEEDS=30
  COMPILE_ARGS=(--cfg-stages-only --no-profile --compile-backend eager)  # dynamo without Inductor: seconds on a CPU
fi

echo "GPU window ($MODE): budget ${BUDGET}s, results in $OUT"
step wheels 30 5 bash -c install_wheels
step environment 20 5 bash -c record_environment
if [[ $MODE == rehearse ]]; then
  step kernel-on-cpu 30 10 "$PY" -m cinemo_rt._kernels.cuda_on_cpu
else
  record kernel-on-cpu "skipped: the GPU runs the kernel itself" 0
fi
step latency-fp16 120 40 "${LATENCY[@]}" --backends torch-fp16 "${OUTPUTS[@]}"
step latency-fast 80 30 "${LATENCY[@]}" --backends torch-fast "${OUTPUTS[@]}"
step latency-fp32 60 20 "${LATENCY[@]}" --backends torch-fp32 --no-profile "${OUTPUTS[@]}"
step gpu-tests 90 30 "${GPU_TESTS[@]}"
if [[ $MODE == gpu ]]; then
  step kernel-benchmark 25 10 "$PY" benchmarks/dct_kernels.py --repeats 50 --warmup 5 --out "$OUT"
else
  no_gpu kernel-benchmark
fi
step compile 150 "$COMPILE_NEEDS" "${LATENCY[@]}" --backends torch-fast-compile "${COMPILE_ARGS[@]}" --out "$OUT/compile" \
  --outputs "$SCRATCH/outputs"  # parity against the fp32 reference of latency-fp32
if [[ $MODE == gpu ]]; then step kernel-ctest 60 45 bash -c kernel_ctest; else no_gpu kernel-ctest; fi

echo "results in $OUT after $(($(date +%s) - START)) s"
echo
"$PY" benchmarks/gpu/summary.py "$STEPS" "$OUT" || FAILED=1
if ((UNFINISHED)); then echo "some steps did not finish in their limits (not failures): see the summary"; fi
exit $FAILED
