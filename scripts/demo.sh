#!/usr/bin/env bash
# The main job on the embedded default model, as a user would type it: look at the model,
# generate from it, convert it to int4, generate from the checkpoint, and measure what int8/int4
# weights and an 8-bit KV cache cost and buy against the 16-bit model.
set -euo pipefail
out=${LOWBIT_DEMO_DIR:-${TMPDIR:-/tmp}/lowbit-demo}
run() { echo; echo "\$ $*"; "$@"; }
run lowbit info
run lowbit generate --chat "What is the capital of France? Answer in one sentence." -n 48
run lowbit convert "$out/smollm2-int4" --weights int4 --force
run lowbit generate -m "$out/smollm2-int4" --chat "Name three colours." -n 32
run lowbit compare --weights 16,int8,int4 --kv 16,8 --windows 2 --json "$out/compare.json"
