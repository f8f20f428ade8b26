#!/usr/bin/env bash
# The GPU check (issue 21; bench/gpu_check.py says what it measures): puts Ray, Optuna and the rest of the carry
# (bench/gpu_carry.sh) on PYTHONPATH, beside this repository, and runs bench/gpu_check.py with the same arguments.
#
#   bash bench/gpu_check.sh [--out DIR] [--data DIR] [--budget-s 450]      on a GPU machine; the carry is .carry/
#   bash bench/gpu_check.sh --dry-run --out DIR                            on a CPU, with this machine's Ray
#   bash bench/gpu_check.sh --dry-run --carry .carry-py3.11 --bare-image   on a CPU, importing like the GPU image:
#        Ray and the rest from the carry, and nothing from site-packages that the image lacks (bench/bare_image/)
#
# --carry DIR (default .carry/ when it exists, except in a dry run): its site-pyX.Y.tar.xz (this Python's X.Y) is
# unpacked into $KD_CARRY_DIR (default /tmp/kd-carry) once, and its nsmc.tar.xz too, which becomes --data unless
# one is given.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
CARRY=""; DRY=0; BARE=0; HAS_DATA=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --carry) CARRY=${args[$((i + 1))]:-} ;;
    --dry-run) DRY=1 ;;
    --bare-image) BARE=1 ;;
    --data) HAS_DATA=1 ;;
  esac
done
if [ -z "$CARRY" ] && [ "$DRY" = 0 ] && [ -d "$ROOT/.carry" ]; then CARRY="$ROOT/.carry"; fi

# Python's tarfile rather than tar -J: the image may have no xz program, its Python always has lzma.
untar() { "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$1" "$2"; }
pypath="$ROOT"
extra=()
if [ -n "$CARRY" ]; then
  pyv=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  site_tar="$CARRY/site-py$pyv.tar.xz"
  [ -f "$site_tar" ] || { echo "gpu_check.sh: $site_tar not found (bash bench/gpu_carry.sh --python-version $pyv)" >&2; exit 2; }
  dest=${KD_CARRY_DIR:-/tmp/kd-carry}
  mkdir -p "$dest"
  key=$(stat -c '%s %Y' "$site_tar")
  if [ "$(cat "$dest/site-py$pyv.key" 2>/dev/null)" != "$key" ]; then
    t0=$(date +%s.%N)
    rm -rf "$dest/site-py$pyv"; mkdir -p "$dest/site-py$pyv"
    untar "$site_tar" "$dest/site-py$pyv"
    echo "$key" > "$dest/site-py$pyv.key"
    echo "carry: unpacked $site_tar in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}') s" >&2
  fi
  pypath="$dest/site-py$pyv:$ROOT"  # the carry first: its typing_extensions is newer than an image's may be
  if [ -f "$CARRY/nsmc.tar.xz" ] && [ "$HAS_DATA" = 0 ]; then
    if [ ! -f "$dest/nsmc/ratings_train.txt" ]; then
      mkdir -p "$dest/nsmc" && untar "$CARRY/nsmc.tar.xz" "$dest/nsmc"
    fi
    extra=(--data "$dest/nsmc")
  fi
fi
if [ "$BARE" = 1 ]; then
  export KD_BARE_IMAGE_ALLOW="${pypath}"
  pypath="$ROOT/bench/bare_image:$pypath"
fi
export PYTHONPATH="$pypath" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PY" "$ROOT/bench/gpu_check.py" "$@" "${extra[@]}"
