#!/usr/bin/env bash
# A folder of wheels that installs longctx on an offline GPU node (scripts/install_offline.sh).
#
# Why: cluster compute nodes often have no internet and their own CUDA build of torch. Run this
# on a machine that reaches PyPI: it builds the longctx wheel from this checkout and downloads
# every dependency of it (pyproject.toml's `dependencies`, plus --extras) for the NODE's Python
# and platform (pip resolves for --python-version/--platform, not for this machine), except
# torch and what only torch needs (triton, nvidia-*, cuda-*, sympy, networkx ...): the node
# keeps its own torch. torch is never downloaded, not even to resolve: pip resolves against a
# metadata-only stand-in wheel (torch==--torch-version, no dependencies) made here.
# Dependencies that PyPI has only as sdists for the node's Python (for lm-eval 0.4.13:
# rouge-score >= 0.1, sqlitedict, word2number) are built here into pure-Python wheels -- the
# known ones first, any other found by trying -- so the folder holds wheels only.
# --exclude leaves out packages the node already has (numpy, scipy, pyarrow ...) and whatever
# only they need; --constraint FILE (e.g. the node's versions) keeps the resolution compatible.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/wheelhouse.sh [options]

Downloads the longctx wheel (built from this checkout) and its dependencies, without torch,
for an offline node; install them there with scripts/install_offline.sh DIR.

  --dest DIR            the folder (default: wheelhouse/); the *.whl already in it are replaced
  --python-version V    the node's Python, MAJOR.MINOR (default: 3.12)
  --platform TAG        a platform tag of the node, repeatable (default: manylinux x86_64,
                        manylinux_2_35 down to manylinux1)
  --exclude NAME        a package the node already has, repeatable (numpy, scipy, pyarrow ...):
                        left out, with whatever only it needs
  --extras LIST         optional dependencies to add: dev, gpu or dev,gpu (gpu's kernels are
                        sdists compiled against CUDA: the script stops; build them on the node)
  --constraint FILE     pip constraints for the resolution (e.g. the versions the node has)
  --torch-version V     the node's torch, which the resolution assumes (default: 2.11.0)
  -h, --help            this help

torch, triton, nvidia-* and cuda-* are always left out. PYTHON: the interpreter whose pip does
the work (default: .venv/bin/python, else python3); its own Python version does not matter.
EOF
}

die() { echo "wheelhouse.sh: error: $*" >&2; exit 1; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=wheelhouse
PYV=3.12
TORCH_VERSION=2.11.0
PLATFORMS=()
EXCLUDES=()
EXTRAS=""
CONSTRAINTS=()
# PyPI has these only as sdists for recent Pythons (rouge-score also as an old 0.0.4 wheel, which
# pip would pick otherwise); any other such dependency is found by trying.
SDIST_ONLY=(rouge-score sqlitedict word2number)
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST=${2:?--dest needs a folder}; shift 2 ;;
    --python-version) PYV=${2:?--python-version needs a version}; shift 2 ;;
    --platform) PLATFORMS+=("${2:?--platform needs a tag}"); shift 2 ;;
    --exclude) EXCLUDES+=("${2:?--exclude needs a name}"); shift 2 ;;
    --extras) EXTRAS=${2:?--extras needs dev, gpu or dev,gpu}; shift 2 ;;
    --constraint) [ -f "${2:?--constraint needs a file}" ] || die "no such file: $2"
                  CONSTRAINTS+=(--constraint "$(realpath "$2")"); shift 2 ;;
    --torch-version) TORCH_VERSION=${2:?--torch-version needs a version}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ "$PYV" =~ ^3\.[0-9]+$ ]] || die "--python-version takes MAJOR.MINOR, e.g. 3.12 (got '$PYV')"
[[ "$EXTRAS" =~ ^((dev|gpu)(,(dev|gpu))*)?$ ]] || die "--extras takes dev, gpu or dev,gpu (got '$EXTRAS')"
[[ "$TORCH_VERSION" =~ ^[0-9]+(\.[0-9]+)*$ ]] || die "--torch-version takes a release such as 2.11.0 (got '$TORCH_VERSION')"
if [ ${#PLATFORMS[@]} -eq 0 ]; then
  for glibc in 2_35 2_34 2_31 2_28 2_27 2_24 2_17; do PLATFORMS+=("manylinux_${glibc}_x86_64"); done
  PLATFORMS+=(manylinux2014_x86_64 manylinux1_x86_64)
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
PIP=("$PYTHON" -m pip)
"${PIP[@]}" --version >/dev/null 2>&1 || die "no pip in $PYTHON (set PYTHON=...)"
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOCAL="$WORK/local"   # wheels built here: longctx itself and the sdist-only dependencies
mkdir -p "$LOCAL" "$WORK/stub" "$WORK/sdist" "$WORK/out"
# Resolve and download for the node, not for this machine.
TARGET=(--python-version "$PYV" --implementation cp --only-binary=:all:)
for p in "${PLATFORMS[@]}"; do TARGET+=(--platform "$p"); done

# Builds use this interpreter's setuptools where it is recent enough (faster, and works
# offline), else pip's isolated build environment.
NO_ISOLATION=()
if "$PYTHON" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 71)' 2>/dev/null; then
  NO_ISOLATION=(--no-build-isolation)
fi

run_pip() {  # run_pip LOG ARGS...: pip with its output in LOG; on failure its errors, status 1
  local log=$1; shift
  if ! "${PIP[@]}" "$@" >"$log" 2>&1; then
    grep -E '^ERROR' "$log" >&2 || tail -n 20 "$log" >&2
    return 1
  fi
}

build_sdist() {  # build_sdist SPEC: SPEC's sdist built into a pure-Python wheel in $LOCAL
  local spec=$1 name w
  name=$(sed 's/[][<>=!~;, ].*//' <<<"$spec")
  echo "wheelhouse: building $spec from its sdist (PyPI has no wheel of it for the node)"
  local args=(wheel --no-deps --no-binary "$name" --wheel-dir "$WORK/sdist" "$spec")
  if ! { [ ${#NO_ISOLATION[@]} -gt 0 ] && "${PIP[@]}" "${args[@]}" "${NO_ISOLATION[@]}" >"$WORK/sdist.log" 2>&1; }; then
    run_pip "$WORK/sdist.log" "${args[@]}" || die "pip could not build $spec from its sdist (pip's errors above)"
  fi
  for w in "$WORK"/sdist/*.whl; do
    case "$w" in
      *-none-any.whl) mv "$w" "$LOCAL/" ;;
      *) die "$spec has no wheel for Python $PYV on these platforms and its sdist compiles ($(basename "$w")): build it on the node, or --exclude it if the node has it" ;;
    esac
  done
}

echo "wheelhouse: building the longctx wheel from $ROOT"
# From a copy of the checkout's files (tracked and new, not ignored): no stale build/ of its own.
SRC=$ROOT
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  SRC="$WORK/src"
  mkdir -p "$SRC"
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | tar -C "$ROOT" --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -C "$SRC" -xf -
fi
run_pip "$WORK/build.log" wheel --no-deps "${NO_ISOLATION[@]}" --wheel-dir "$LOCAL" "$SRC" \
  || die "pip could not build the longctx wheel from $ROOT (pip's errors above)"
ROOT_REQ="$(ls "$LOCAL"/longctx_eval-*.whl)${EXTRAS:+[$EXTRAS]}"

# The stand-in torch: a name and a version, no dependencies, no files; never put in the folder.
STUB="$WORK/stub/torch-$TORCH_VERSION-py3-none-any.whl"
"$PYTHON" - "$STUB" "$TORCH_VERSION" <<'PY'
import base64, hashlib, sys, zipfile

path, version = sys.argv[1:]
info = f"torch-{version}.dist-info"
files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n"
                             "Summary: stand-in for the node's own torch (scripts/wheelhouse.sh)\n",
         f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: wheelhouse.sh\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
digest = lambda text: base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
files[f"{info}/RECORD"] = "".join(f"{n},sha256={digest(t)},{len(t.encode())}\n" for n, t in files.items()) + f"{info}/RECORD,,\n"
with zipfile.ZipFile(path, "w") as wheel:
    for name, text in files.items():
        wheel.writestr(name, text)
PY

for spec in "${SDIST_ONLY[@]}"; do build_sdist "$spec"; done
# Resolve the closure for the node; a dependency with no wheel for it is built from its sdist
# (it must come out pure Python) and the resolution runs again.
echo "wheelhouse: resolving longctx${EXTRAS:+[$EXTRAS]} for CPython $PYV on ${PLATFORMS[*]}, assuming torch $TORCH_VERSION"
BUILT=("${SDIST_ONLY[@]}")
RESOLVED=0
for _ in $(seq 1 20); do
  if "${PIP[@]}" install --dry-run --ignore-installed --target "$WORK/target" --report "$WORK/report.json" \
      "${TARGET[@]}" --find-links "$LOCAL" "${CONSTRAINTS[@]}" "$ROOT_REQ" "$STUB" >"$WORK/resolve.log" 2>&1; then
    RESOLVED=1
    break
  fi
  spec=$(sed -n 's/^ERROR: No matching distribution found for \([^ ]*\).*/\1/p' "$WORK/resolve.log" | head -n 1)
  if [ -z "$spec" ]; then
    grep -E '^ERROR' "$WORK/resolve.log" >&2 || tail -n 20 "$WORK/resolve.log" >&2
    die "pip could not resolve longctx's dependencies for Python $PYV (pip's errors above)"
  fi
  name=$(sed 's/[][<>=!~;, ].*//' <<<"$spec")
  for b in "${BUILT[@]}"; do
    [ "$b" != "$name" ] || die "no version of $spec fits Python $PYV on these platforms, even built from its sdist"
  done
  build_sdist "$spec"
  BUILT+=("$name")
done
[ "$RESOLVED" = 1 ] || die "still unresolved after building ${#BUILT[@]} sdists (run pip by hand to see why)"

# Keep what longctx needs without passing through an excluded package (torch, triton, nvidia-*,
# cuda-*, --exclude). Writes lines "keep|skip NAME VERSION URL", and "need NAME SPECIFIERS" for
# what the kept packages require of the excluded ones (what the node must have).
"$PYTHON" - "$WORK/report.json" "$PYV" "${PLATFORMS[0]}" "${EXCLUDES[@]}" >"$WORK/plan.txt" <<'PY'
import fnmatch, json, sys
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

report, pyv, platform, *excludes = sys.argv[1:]
patterns = ["torch", "triton", "nvidia-*", "cuda-*"] + [canonicalize_name(e) for e in excludes]
machine = next((m for m in ("aarch64", "arm64", "ppc64le", "s390x") if m in platform), "x86_64")
system, sys_platform = ("Linux", "linux") if "linux" in platform else ("Darwin", "darwin") if "macosx" in platform else ("Windows", "win32")
env = {"python_version": pyv, "python_full_version": pyv + ".0", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "nt" if sys_platform == "win32" else "posix",
       "platform_system": system, "sys_platform": sys_platform, "platform_machine": machine}
items = {canonicalize_name(i["metadata"]["name"]): i for i in json.load(open(report))["install"]}
todo = [(name, tuple(i.get("requested_extras") or ())) for name, i in items.items() if i.get("requested")]
excluded = lambda name: any(fnmatch.fnmatch(name, p) for p in patterns)
seen, keep, need = set(), set(), {}
while todo:
    name, extras = todo.pop()
    if (name, extras) in seen or name not in items or excluded(name):
        continue
    seen.add((name, extras))
    keep.add(name)
    for line in items[name]["metadata"].get("requires_dist") or ():
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            todo.append((canonicalize_name(req.name), tuple(sorted(req.extras))))
            if excluded(canonicalize_name(req.name)):
                need.setdefault(canonicalize_name(req.name), set()).update(str(s) for s in req.specifier)
for name, item in sorted(items.items()):
    print("keep" if name in keep else "skip", item["metadata"]["name"], item["metadata"]["version"], item["download_info"]["url"])
for name, specs in sorted(need.items()):
    print("need", name + ",".join(sorted(specs)))
PY

SKIPPED=$(awk '$1 == "skip" {printf "%s%s %s", sep, $2, $3; sep = ", "}' "$WORK/plan.txt")
NEEDS=$(awk '$1 == "need" {printf "%s%s", sep, $2; sep = " "}' "$WORK/plan.txt")
echo "wheelhouse: left out (the node's own): ${SKIPPED:-nothing}"
echo "wheelhouse: the node must have: ${NEEDS:-nothing}"
# Wheels built here are copied; the others downloaded for the node, one exact version each.
PINS=()
while read -r word name version url; do
  [ "$word" = keep ] || continue
  case "$url" in
    "file://$LOCAL/"*) cp "$LOCAL/$(basename "$url")" "$WORK/out/" ;;
    *) PINS+=("$name==$version") ;;
  esac
done <"$WORK/plan.txt"
if [ ${#PINS[@]} -gt 0 ]; then
  echo "wheelhouse: downloading ${#PINS[@]} wheels"
  run_pip "$WORK/download.log" download --no-deps --dest "$WORK/out" "${TARGET[@]}" "${PINS[@]}" \
    || die "pip could not download the wheels (pip's errors above)"
fi
for w in "$WORK"/out/*; do
  case "$(basename "$w")" in
    torch-*|triton-*|nvidia_*|cuda_*) die "$(basename "$w") came into the folder: a bug in this script" ;;
    *.whl) ;;
    *) die "pip fetched something other than a wheel: $(basename "$w")" ;;
  esac
done
rm -f "$DEST"/*.whl
mv "$WORK"/out/*.whl "$DEST/"
n=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l)
bytes=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
echo "wheelhouse: $n wheels, $(awk -v b="$bytes" 'BEGIN {printf "%.1f MiB", b / 1048576}') in $DEST"
