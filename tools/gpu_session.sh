#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (see /work/.library/device/METHOD.md):
#
#   make gpu-wheels                       # here, once: the wheels the device image lacks -> .gpu_wheels/
#   run(command="bash tools/gpu_session.sh", carry=[".gpu_wheels"])
#
# The device machine reaches no package index. Its image has PyTorch, Triton, transformers,
# tokenizers, safetensors, einops, pyarrow, matplotlib and tensorboard; Megatron-Core, mbridge,
# omegaconf and math-verify come from the carried wheels (installed into a scratch directory, not
# into the image's environment). Writes logs and benchmark JSON under $OUT (and
# benchmarks/results/), then prints a short table last.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=$(mktemp -d)/site
WHEELS=${GPU_WHEELS:-.gpu_wheels}

"$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$WHEELS"/*.whl > "$OUT/pip.log" 2>&1 \
  || { echo "wheel install failed, see pip.log"; tail -n 20 "$OUT/pip.log"; exit 1; }
# kernels/ is installed as `uniopd_kernels` by setup.py; a link does the same without installing.
ln -sfn "$PWD/kernels" "$SITE/uniopd_kernels"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi; "$PY" -c "
import torch, triton, transformers, megatron.core as m
print(torch.__version__, triton.__version__, transformers.__version__, m.__version__, m.__file__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"; } \
  > "$OUT/env.txt" 2>&1
status=()
run_step() {  # name, command...: log to $OUT/name.log, remember the exit code
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  status+=("$name rc=$rc $((SECONDS - t0))s")
}
# GPU-only tests first (correctness before speed), then the benchmarks.
run_step gpu_tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
run_step kernel_tests "$PY" -m pytest -q -p no:cacheprovider tests/test_kernel_token_logprobs.py \
  tests/test_kernel_advantages.py tests/test_kernel_linear.py
run_step kernels "$PY" benchmarks/kernels.py --out-dir "$OUT"
run_step learner "$PY" benchmarks/learner.py --out-dir "$OUT"
# results for committing (a CPU dry run must not overwrite the committed smoke files)
"$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null && cp "$OUT"/*.json benchmarks/results/

cat "$OUT/env.txt" | tail -n 1
for s in "${status[@]}"; do echo "$s"; done
for f in "$OUT"/*.log; do echo "== $(basename "$f")"; tail -n 6 "$f"; done
