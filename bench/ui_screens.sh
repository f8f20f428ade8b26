#!/usr/bin/env bash
# Screenshots of the two UIs a sweep offers, as a user opens them, so a person can look at what they show:
# `sweep tensorboard` (time series, scalars, HParams) and `sweep dashboard` (optuna-dashboard), with headless
# Chromium (Debian's `chromium` package: apt-get install chromium), both servers on 127.0.0.1 only.
#
#   bash bench/ui_screens.sh SWEEP [OUT_DIR]      # SWEEP: a sweep's name (under results/) or folder
#
# Writes OUT_DIR (default results/ui_screens)/tensorboard_{timeseries,scalars,hparams}.png and dashboard_*.png.
# Ports: TB_PORT (default 16006), DB_PORT (default 18080). The servers are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
sweep_dir=${1:?usage: bash bench/ui_screens.sh SWEEP [OUT_DIR]}
out=${2:-results/ui_screens}
tb_port=${TB_PORT:-16006}
db_port=${DB_PORT:-18080}
python=${PYTHON:-python}
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "ui_screens: no chromium (apt-get install chromium)" >&2; exit 2; }
mkdir -p "$out"

port_free() {
  "$python" -c "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1]))); s.close()" "$1" \
    2>/dev/null || { echo "ui_screens: port $1 is in use (set TB_PORT/DB_PORT)" >&2; exit 2; }
}
port_free "$tb_port"
port_free "$db_port"
# Each server in its own process group (`sweep tensorboard` runs TensorBoard as a child), stopped as a group.
setsid "$python" -m sweep.cli tensorboard "$sweep_dir" --port "$tb_port" >"$out/tensorboard.log" 2>&1 &
tb=$!
setsid "$python" -m sweep.cli dashboard "$sweep_dir" --port "$db_port" >"$out/dashboard.log" 2>&1 &
db=$!
trap 'kill -- -$tb -$db 2>/dev/null || true; wait 2>/dev/null || true' EXIT

wait_for() {  # until the URL answers, at most 90 s
  for _ in $(seq 1 180); do
    if "$python" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  echo "ui_screens: $1 did not answer" >&2
  return 1
}
wait_for "http://127.0.0.1:$tb_port/"
wait_for "http://127.0.0.1:$db_port/"

shot() {  # name url: a 1600x1000 page after its scripts have had 20 s of (virtual) time to load the data
  "$browser" --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
    --virtual-time-budget=20000 --screenshot="$out/$1.png" "$2" >/dev/null 2>&1
  echo "ui_screens: $out/$1.png ($2)"
}
# forceSVG: TensorBoard draws its charts with WebGL, which headless Chromium without a GPU leaves blank
shot tensorboard_timeseries "http://127.0.0.1:$tb_port/?forceSVG=true#timeseries"
shot tensorboard_scalars "http://127.0.0.1:$tb_port/?forceSVG=true#scalars"
shot tensorboard_hparams "http://127.0.0.1:$tb_port/#hparams"
shot dashboard_study "http://127.0.0.1:$db_port/dashboard/studies/1"
shot dashboard_history "http://127.0.0.1:$db_port/dashboard/studies/1/analytics"
