#!/usr/bin/env bash
# Installs longctx on an offline GPU node from a wheelhouse made by scripts/wheelhouse.sh, then
# optionally runs the GPU benchmark.
#
# Why: cluster compute nodes often have no internet and their own CUDA build of torch. This uses
# the node's interpreter (PYTHON, default python3) and installs with
# `pip install --no-index --find-links WHEELHOUSE`: nothing is fetched, torch stays the node's own
# (the wheelhouse has none; the script stops first if torch cannot be imported), and packages
# the node already has at a satisfying version are kept (pip's default), so a wheelhouse made
# with --exclude works where the node has those. --editable installs a checkout instead of the
# longctx wheel (pip's --no-build-isolation: the node's setuptools builds it, offline).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/install_offline.sh WHEELHOUSE [--editable PROJECT_DIR] [--extras dev]
                                  [--bench] [-- BENCH_ARGS...]

Installs longctx and its dependencies from WHEELHOUSE (scripts/wheelhouse.sh) without network,
into the node's Python (PYTHON, default python3), keeping the node's torch.

  --editable DIR   install the checkout DIR editable (pip -e, --no-build-isolation) instead of
                   the wheel in WHEELHOUSE
  --extras LIST    optional dependencies to install too (e.g. dev), if the wheelhouse has them
  --bench          then run `python benchmarks/gpu/bench.py BENCH_ARGS` in the project
                   directory (DIR, else the checkout holding this script)
  -- BENCH_ARGS    arguments for the benchmark (implies --bench)
  -h, --help       this help
EOF
}

die() { echo "install_offline.sh: error: $*" >&2; exit 1; }

WHEELHOUSE=""
EDITABLE=""
EXTRAS=""
BENCH=0
BENCH_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --editable) EDITABLE=${2:?--editable needs a project directory}; shift 2 ;;
    --extras) EXTRAS=${2:?--extras needs a list, e.g. dev}; shift 2 ;;
    --bench) BENCH=1; shift ;;
    --) shift; BENCH=1; BENCH_ARGS=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *) [ -z "$WHEELHOUSE" ] || die "one wheelhouse only (got '$WHEELHOUSE' and '$1')"
       WHEELHOUSE=$1; shift ;;
  esac
done
[ -n "$WHEELHOUSE" ] || { usage >&2; die "no WHEELHOUSE given"; }
[ -d "$WHEELHOUSE" ] || die "no such wheelhouse folder: $WHEELHOUSE"
WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
PY=${PYTHON:-python3}
PROJECT=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "$EDITABLE" ]; then
  [ -f "$EDITABLE/pyproject.toml" ] || die "$EDITABLE is not a longctx checkout (no pyproject.toml)"
  PROJECT=$(cd "$EDITABLE" && pwd)
fi

command -v "$PY" >/dev/null 2>&1 || die "no interpreter '$PY' (set PYTHON=...)"
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip"
PY=$("$PY" -c 'import sys; print(sys.executable)')  # absolute: the checks below run elsewhere
echo "install_offline: $PY, Python $("$PY" -c 'import sys; print(sys.version.split()[0])')"
# torch first: the wheelhouse has none, so pip could not install it here.
if ! ERR=$("$PY" -c 'import torch' 2>&1 >/dev/null); then
  die "torch is missing: '$PY -c \"import torch\"' fails ($(tail -n 1 <<<"$ERR")); load or install the node's own torch (>= 2.6) first, or point PYTHON at the interpreter that has it"
fi
echo "install_offline: torch $("$PY" -c 'import torch; print(torch.__version__, "| CUDA", torch.version.cuda, "| GPU available:", torch.cuda.is_available())' 2>/dev/null) (the node's own, kept)"

if [ -n "$EDITABLE" ]; then
  TARGET=("-e" "$PROJECT${EXTRAS:+[$EXTRAS]}")
  BUILD=(--no-build-isolation)
else
  shopt -s nullglob
  wheels=("$WHEELHOUSE"/longctx_eval-*.whl)
  [ ${#wheels[@]} -eq 1 ] || die "expected one longctx_eval-*.whl in $WHEELHOUSE, found ${#wheels[@]} (rerun scripts/wheelhouse.sh)"
  TARGET=("${wheels[0]}${EXTRAS:+[$EXTRAS]}")
  BUILD=()
fi
CMD=("$PY" -m pip install --no-index --find-links "$WHEELHOUSE" "${BUILD[@]}" "${TARGET[@]}")
echo "install_offline: ${CMD[*]}"
if ! "${CMD[@]}"; then
  die "pip could not install longctx from $WHEELHOUSE without network: see pip's error above (a package missing from the wheelhouse: rebuild it without --exclude for that one, or with the node's --python-version)"
fi
# The installed package, imported away from the checkout.
(cd / && "$PY" -c 'import longctx, lm_eval, transformers; print("install_offline: longctx ready:", longctx.__file__, "| transformers", transformers.__version__)') \
  || die "longctx installed but does not import (error above)"
"$PY" -m pip check || echo "install_offline: warning: pip check reports inconsistent packages on this node (above)" >&2

if [ "$BENCH" = 1 ]; then
  [ -f "$PROJECT/benchmarks/gpu/bench.py" ] || die "no benchmarks/gpu/bench.py in $PROJECT"
  echo "install_offline: python benchmarks/gpu/bench.py ${BENCH_ARGS[*]} (in $PROJECT)"
  cd "$PROJECT"
  exec "$PY" benchmarks/gpu/bench.py "${BENCH_ARGS[@]}"
fi
