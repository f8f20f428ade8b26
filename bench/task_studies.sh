#!/usr/bin/env bash
# The seed's three other studies, each as the sweep its search space runs with the default config (sized for a
# 2-core CPU), one after the other on an otherwise idle machine, then what each exports read by its next stage:
#   lm:          validation bits per character, loss and perplexity of the best LM; `sweep predict` on its export
#   tagger:      token accuracy (padding excluded) of the best tagger; `sweep predict` on its export
#   transformer: the best teacher's NSMC accuracy on the whole 50K test split (`sweep evaluate` on its
#                save_pretrained export) and the sweep's wall time
#     bash bench/task_studies.sh [OUT]        (default OUT: /tmp/kd-bench-tasks; about 40 min on 2 cores)
# Prints each sweep's wall time and report table; the figures go to results/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/kd-bench-tasks}
nsmc=${NSMC:-../shared/data/nsmc}
mkdir -p "$out"
for study in lm tagger transformer; do
  t0=$(date +%s.%N)
  python -m sweep.cli run "search_spaces/seed_$study.yaml" --set "results_dir=$out" --set "cache_dir=$out/cache" --force
  t1=$(date +%s.%N)
  echo "== seed_$study: sweep wall $(python -c "print(round($t1 - $t0, 1))") s"
  python -m sweep.cli report "$out/seed_$study" | sed -n '1,40p'
  rm -rf "$out/export_$study"
  python -m sweep.cli export "$out/seed_$study" --out "$out/export_$study"
done
python -m sweep.cli predict "$out/export_lm" "정말 재미있는 영화였다" "ㅁㄴㅇㄹ ㅋㅋ 123 asdf"
python -m sweep.cli predict "$out/export_tagger" "정말 재미있는 영화였다"
python -m sweep.cli evaluate "$out/export_transformer" "$nsmc/ratings_test.txt"
