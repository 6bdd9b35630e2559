#!/usr/bin/env bash
# The GPU check of issue 17: one command, one table, within 8 minutes on one H200.
#   recover (torchvision ResNet-18, 224 px, batch 100; plain eager fp32 vs distillset with bf16, channels-last and
#   torch.compile), relabel crops/s, RDED selection images/s, DM and DC step time, student training epochs/s.
# Usage: benchmarks/device_check.sh [--tiny] [--device cuda|cpu] [--compile 0|1]
#   --tiny runs every row at toy sizes on a CPU in seconds (tests/test_matching_perf.py runs it).
# Writes benchmarks/results/device_check.md (device_check_tiny.md with --tiny) beside printing the table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
name=device_check
for arg in "$@"; do [ "$arg" = "--tiny" ] && name=device_check_tiny; done
# 7.5 minutes at most, so the 8-minute budget holds even when a row is slower than expected
exec timeout 450 "$PY" benchmarks/device_check.py --out "benchmarks/results/${name}.md" "$@"
