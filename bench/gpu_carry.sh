#!/usr/bin/env bash
# Fills the carry folder that bench/gpu_check.sh needs on a bare GPU machine (issue 21): Python 3.12 with its own
# CUDA torch, pyarrow, pandas, grpcio, protobuf, msgpack, tensorboard, pyyaml, scikit-learn, transformers, but no
# Ray, no Optuna, no pydantic, and no registry to install them from (../shared/RAY_NOTES.md, "Ray on the GPU
# machine"; the image's package list: /work/.library/device/KINDS.md).
#
#   bash bench/gpu_carry.sh                          # .carry/ for the GPU machine (cp312), prints its size
#   bash bench/gpu_carry.sh --python-version 3.11    # .carry-py3.11/ : the same for this machine's Python, so the
#                                                    # CPU dry run can import from it (bench/gpu_check.sh --carry)
#   options: --out DIR, --data DIR (the NSMC folder, default ../shared/data/nsmc), --no-data
#
# What it writes (the folder is git-ignored; it travels with a device call by naming it in `carry`):
#   site-pyX.Y.tar.xz  Ray 2.60.0's manylinux wheel for that Python, unpacked, without ray/jars (Java workers),
#                      ray/rllib, ray/serve, ray/llm (none of them imported by Ray Tune) and ray/dashboard/client
#                      (the dashboard's web pages; the check runs with the dashboard off); plus Optuna and the
#                      pure-Python (and two small compiled) packages that Ray[tune], Optuna and this project need
#                      and the image lacks: PACKAGES below, pinned to the versions CI tests with. SQLAlchemy is its
#                      pure-Python wheel (its C speed-ups matter for ORM-heavy code, not for Optuna's SQLite
#                      study): 2 MB instead of 5.
#   nsmc.tar.xz        ratings_train.txt and ratings_test.txt (20 MB of text, ~6 MB packed). Not unlabeled.txt:
#                      the check uses no transfer set, and its 47 MB would not fit beside Ray in 40 MiB.
#   MANIFEST.txt       what is inside: versions, sizes, sha256, and the inputs' key (a rerun with the same key
#                      rebuilds nothing: the script is idempotent).
# Wheels are downloaded into .cache/carry-wheels/pyX.Y/ (git-ignored; pip reuses what is there), never into the
# carry folder, which must stay small: the device tool carries at most 64 MiB with the working tree.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYV=3.12
OUT=
DATA="$ROOT/../shared/data/nsmc"
WITH_DATA=1
LIMIT_MIB=40
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYV=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --no-data) WITH_DATA=0; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_carry.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$PYV" in 3.[0-9]|3.[0-9][0-9]) ;; *) echo "gpu_carry.sh: --python-version: expected e.g. 3.12, got $PYV" >&2; exit 2 ;; esac
if [ -z "$OUT" ]; then
  if [ "$PYV" = 3.12 ]; then OUT="$ROOT/.carry"; else OUT="$ROOT/.carry-py$PYV"; fi
fi
if [ "$WITH_DATA" = 1 ] && { [ ! -f "$DATA/ratings_train.txt" ] || [ ! -f "$DATA/ratings_test.txt" ]; }; then
  echo "gpu_carry.sh: --data: $DATA has no ratings_train.txt and ratings_test.txt (the NSMC folder; or --no-data)" >&2
  exit 2
fi
PY=${PYTHON:-python3}
TAG=cp${PYV/./}

# Binary wheels (cp$TAG, manylinux) and pure-Python ones. What the GPU image already has (KINDS.md: click,
# filelock, msgpack, packaging, protobuf, pyyaml, requests, attrs, numpy, pandas, pyarrow, fsspec, tqdm, markupsafe,
# scikit-learn, transformers, tokenizers, tensorboard, matplotlib) is not carried.
BINARY=(
  ray==2.60.0                   # the wheel is 79 MB; unpacked and trimmed below
  pydantic_core==2.46.4         # pydantic: our config, and Ray Tune's
  rpds-py==0.30.0               # jsonschema (Ray validates its runtime configs with it)
)
PURE=(
  optuna==5.1.0
  alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9 colorlog==6.12.0           # Optuna's
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0  # Ray's
  tensorboardX==2.6.5                                                        # Ray Tune's
  pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2
  typing_extensions==4.16.0     # pydantic needs >= 4.14.1; the image's may be older (one 100 KB file)
)
TRIM=(ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client bin)

KEY=$(printf '%s\n' "$PYV" "${BINARY[@]}" "${PURE[@]}" "${TRIM[@]}" | sha256sum | cut -c1-16)
WHEELS="$ROOT/.cache/carry-wheels/py$PYV"
SITE_TAR="$OUT/site-py$PYV.tar.xz"
mkdir -p "$OUT" "$WHEELS"

# pip, minus its notes about this machine's unused extra index and root user; its own exit status kept.
quiet_pip() { local out rc=0; out=$("$@" 2>&1) || rc=$?
  grep -v -e "is ignored: it is neither a file nor a directory" -e "Running pip as the 'root' user" <<<"$out" || true
  return $rc; }
mib() { du -sb "$1" | awk '{printf "%.1f", $1 / 1048576}'; }
manifest_key() { [ -f "$OUT/MANIFEST.txt" ] && sed -n "s/^$1 key: //p" "$OUT/MANIFEST.txt" || true; }

if [ -f "$SITE_TAR" ] && [ "$(manifest_key site)" = "$KEY" ]; then
  echo "site: $SITE_TAR is up to date (key $KEY), nothing downloaded"
  SITE_BUILT=0
else
  before=$(ls "$WHEELS")
  echo "site: downloading into $WHEELS (pip reuses wheels already there)"
  pip_dl=(quiet_pip "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" -d "$WHEELS")
  "${pip_dl[@]}" --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 "${BINARY[@]}"
  "${pip_dl[@]}" --implementation py --platform any "${PURE[@]}"
  new=$(comm -13 <(echo "$before") <(ls "$WHEELS") | tr '\n' ' ')
  echo "site: downloaded: ${new:-nothing new (all cached)}"
  # Only this build's wheels: the cache may hold other versions from an earlier pin.
  wheels=()
  for spec in "${BINARY[@]/%/ $TAG}" "${PURE[@]/%/ none-any}"; do
    kind=${spec##* }; spec=${spec% *}; name=${spec%%==*}; version=${spec##*==}
    norm=$(echo "$name" | tr 'A-Z.-' 'a-z__')
    found=$(cd "$WHEELS" && ls | awk -v n="$norm" -v v="$version" -v k="$kind" '
      { split($0, p, "-"); w=tolower(p[1]); gsub(/[-.]/, "_", w); if (w == n && p[2] == v && index($0, k)) print }' \
      | head -1)
    [ -n "$found" ] || { echo "gpu_carry.sh: no wheel for $spec in $WHEELS" >&2; exit 1; }
    wheels+=("$WHEELS/$found")
  done
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  quiet_pip "$PY" -m pip install -q --no-deps --no-compile --no-index --target "$tmp/site" --python-version "$PYV" \
    --only-binary=:all: --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 "${wheels[@]}"
  [ -d "$tmp/site/ray" ] && [ -d "$tmp/site/optuna" ] || { echo "gpu_carry.sh: the install into $tmp/site failed" >&2; exit 1; }
  for t in "${TRIM[@]}"; do rm -rf "$tmp/site/$t"; done
  echo "site: $(mib "$tmp/site") MiB unpacked; packing with xz -9 (minutes on 2 cores)"
  XZ_OPT="-9 -T0" tar -C "$tmp/site" --sort=name --owner=0 --group=0 -cJf "$SITE_TAR.tmp" .
  mv "$SITE_TAR.tmp" "$SITE_TAR"
  SITE_BUILT=1
fi

DATA_KEY=none
if [ "$WITH_DATA" = 1 ]; then
  DATA_KEY=$(cat "$DATA/ratings_train.txt" "$DATA/ratings_test.txt" | sha256sum | cut -c1-16)
  if [ -f "$OUT/nsmc.tar.xz" ] && [ "$(manifest_key data)" = "$DATA_KEY" ]; then
    echo "data: $OUT/nsmc.tar.xz is up to date (key $DATA_KEY)"
  else
    echo "data: packing ratings_train.txt and ratings_test.txt from $DATA"
    XZ_OPT="-9 -T0" tar -C "$DATA" --owner=0 --group=0 -cJf "$OUT/nsmc.tar.xz.tmp" ratings_train.txt ratings_test.txt
    mv "$OUT/nsmc.tar.xz.tmp" "$OUT/nsmc.tar.xz"
  fi
else
  rm -f "$OUT/nsmc.tar.xz"
fi

{
  echo "# carry folder for bench/gpu_check.sh, written by bench/gpu_carry.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "site key: $KEY"
  echo "data key: $DATA_KEY"
  echo "python: $PYV ($TAG), manylinux x86_64"
  echo "packages: ${BINARY[*]} ${PURE[*]}" | sed 's/  */ /g'
  echo "trimmed from the install: ${TRIM[*]}"
  for f in "$OUT"/*.tar.xz; do
    echo "file: $(basename "$f") $(stat -c %s "$f") bytes sha256 $(sha256sum "$f" | cut -c1-64)"
  done
} > "$OUT/MANIFEST.txt"

size=$(mib "$OUT")
echo "carry: $OUT is $size MiB ($(ls "$OUT" | tr '\n' ' '))"
if awk -v s="$size" -v l="$LIMIT_MIB" 'BEGIN{exit !(s >= l)}'; then
  echo "gpu_carry.sh: $OUT is $size MiB, over the $LIMIT_MIB MiB it may take of a device call's 64 MiB" >&2
  exit 1
fi
