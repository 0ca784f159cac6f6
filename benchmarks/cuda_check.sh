#!/usr/bin/env bash
# The CUDA check of P streams (benchmarks/cuda_check.py), for a machine with an NVIDIA GPU, in one command:
#
#   benchmarks/cuda_check.sh [WORK] [extra cuda_check.py options]
#
# Needs python3 with torch, onnx, numpy, safetensors, tokenizers, typer and rich (the exporter), and
# onnxruntime-gpu with onnxruntime-genai-cuda. Wheels in $WHEELS (default .whl/) are installed first,
# into a private folder, for a machine that cannot reach PyPI. It runs from the repository root
# without installing parscale, and stops after $LIMIT seconds (default 300). Results:
# WORK/cuda_check.{md,json} (and $OUT/ when that is set).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/parscale-cuda}
shift || true
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/parscale-site \
    "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/parscale-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
timeout "${LIMIT:-300}" python3 -m benchmarks.cuda_check --work "$WORK" ${OUT:+--results "$OUT"} "$@"
