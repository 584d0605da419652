#!/usr/bin/env bash
# The checks to run when a session is lent a GPU machine (it has torch, timm, peft, transformers, pytest, xdist, but
# not this project's other dependencies, and no internet): the test suite with CUDA visible, `m4oe bench` on CUDA,
# and `m4oe serve-bench` on CUDA with synthetic images (the shared data does not travel).
#
# Prepare here (wheels of what the image lacks, for its Python 3.12), once per session:
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl monai nibabel pydicom pynrrd \
#     highdicom pyjpegls fastapi starlette pydantic pydantic_core annotated-types typing-inspection \
#     typing_extensions opentelemetry-api uvicorn
# then run `bash examples/device_check.sh` there with `.whl` carried; results land in $OUT.
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device_check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/install.log" 2>&1 || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >> "$OUT/install.log" 2>&1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, peft, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'timm', timm.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
echo "== pytest $(date +%T)"
timeout "${PYTEST_S:-240}" python3 -m pytest -q -p no:cacheprovider -n 8 -rfE --timeout 200 tests > "$OUT/pytest.log" 2>&1
echo "pytest rc $?"; tail -25 "$OUT/pytest.log"
echo "== bench $(date +%T)"
timeout "${BENCH_S:-150}" python3 -m m4oe_adapters.cli bench --device cuda --out "$OUT/bench_cuda.json" > "$OUT/bench.log" 2>&1
echo "bench rc $?"; tail -15 "$OUT/bench.log"
echo "== serve-bench $(date +%T)"
python3 examples/synthetic_serve_data.py /tmp/synthetic --overwrite  # its own scratch folder
timeout "${SERVE_S:-120}" python3 -m m4oe_adapters.cli serve-bench --zoo adapters_zoo --data /tmp/synthetic --device cuda \
  --seconds 15 --memory-adapters 0 --out "$OUT/serve_bench_cuda.json" > "$OUT/serve_bench.log" 2>&1
echo "serve-bench rc $?"; tail -12 "$OUT/serve_bench.log"
