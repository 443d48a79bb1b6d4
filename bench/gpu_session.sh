#!/usr/bin/env bash
# One device session: the CUDA tests, then the reference throughput benchmark, everything
# written under $OUT (a run cut short keeps what it measured). Run from the repository root on
# a GPU machine whose Python lacks droptune's dependencies: they come as wheels in .whl/
# (bench/gpu-wheels.txt lists them and says how to fetch them).
#   bash bench/gpu_session.sh            (OUT defaults to ./gpu-out)
#   TEST_LIMIT=150 BENCH_LIMIT=380 bash bench/gpu_session.sh   (seconds for each part)
set -u -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, pytorch_lightning as pl, optuna, mlflow, droptune; print('torch', torch.__version__, 'lightning', pl.__version__, 'optuna', optuna.__version__, 'mlflow', mlflow.__version__)" | tee -a "$OUT/gpu.txt" || exit 1
timeout "${TEST_LIMIT:-170}" python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu-tests.log"
timeout "${BENCH_LIMIT:-330}" python3 bench/throughput.py --scale reference --device gpu \
  --packed 4 --populations "${POPS:-128}" --pop-workers "${POP_WORKERS:-1,4}" \
  --bf16 "${BF16:-128}" --pure "${PURE:-128}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
