#!/usr/bin/env bash
# Full-size run: teacher from scratch on all 135K training reviews, then the base student with and without
# distillation. About an hour on 2 CPU cores (the teacher takes most of it). Prints both result.json lines.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/full-size}
sweep prepare bench/full_size.yaml
sweep train bench/full_size.yaml --out "$out/distilled" --force
sweep train bench/full_size.yaml --out "$out/no-kd" --force --set train.alpha=1.0
for r in distilled no-kd; do echo "$r: $(cat "$out/$r/result.json" | tr -d '\n ')"; done
