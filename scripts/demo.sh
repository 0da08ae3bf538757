#!/usr/bin/env bash
# The main job on the embedded default model, as a user would type it.
set -euo pipefail
echo '$ lowbit info'
lowbit info
echo
echo '$ lowbit generate --chat "What is the capital of France? Answer in one sentence."'
lowbit generate --chat "What is the capital of France? Answer in one sentence." --max-new-tokens 48
