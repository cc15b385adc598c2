#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with `nvcc -c` for sm_80 and sm_90 (no GPU needed), so the CUDA sources
# cannot rot on machines without one. Include paths come from the torch of $PYTHON (default: the repo's
# .venv if present, else python3). Usage: scripts/cuda_check.sh [-j N]
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "cuda-check: $NVCC not found; nothing to check" >&2
  exit 0
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
JOBS=${JOBS:-$(nproc)}
read -r TORCH_INC PY_INC ABI < <("$PYTHON" - <<'PY'
import os, sysconfig, torch
inc = os.path.join(os.path.dirname(torch.__file__), "include")
print(inc, sysconfig.get_paths()["include"], int(torch._C._GLIBCXX_USE_CXX11_ABI))
PY
)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# A CPU-only torch wheel ships c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h:
# provide it (what a shared-library CUDA build of torch generates) when it is missing.
SHIM=()
if [[ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  mkdir -p "$TMP/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$TMP/shim/c10/cuda/impl/cuda_cmake_macros.h"
  SHIM=(-I"$TMP/shim")
fi
shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then echo "cuda-check: no .cu files"; exit 0; fi
FLAGS=("${SHIM[@]}" -std=c++17 -O2 -Xcompiler -fPIC --expt-relaxed-constexpr
       -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -I"$PY_INC" -Icsrc
       -D_GLIBCXX_USE_CXX11_ABI="$ABI" -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__)  # as torch.utils.cpp_extension builds them
pids=(); names=()
for arch in 80 90; do
  for src in "${SOURCES[@]}"; do
    obj="$TMP/$(basename "$src" .cu).sm$arch.o"
    ( "$NVCC" "${FLAGS[@]}" -gencode "arch=compute_$arch,code=sm_$arch" -c "$src" -o "$obj" \
        >"$obj.log" 2>&1 ) &
    pids+=($!); names+=("$src sm_$arch:$obj.log")
    while (( $(jobs -rp | wc -l) >= JOBS )); do sleep 0.2; done
  done
done
fail=0
for i in "${!pids[@]}"; do
  entry=${names[$i]}; log=${entry#*:}; what=${entry%%:*}
  if wait "${pids[$i]}"; then
    echo "ok   $what"
  else
    echo "FAIL $what"; cat "$log"; fail=1
  fi
  # surface warnings from our own sources (not from the torch headers)
  grep -E "^csrc/cuda/.*warning" "$log" || true
done
exit $fail
