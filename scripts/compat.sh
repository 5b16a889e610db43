#!/usr/bin/env bash
# Try longctx against the newest releases of its dependencies (past pyproject's upper bounds) and
# against the oldest ones pyproject allows, each in its own venv under .compat/, and run the fast
# tests (`-m "not slow"`) in each. Prints which versions passed; exits non-zero if any set failed.
#
#   bash scripts/compat.sh              # newest and oldest
#   bash scripts/compat.sh newest       # one of them (CI runs this one)
#
# torch stays the machine's build that scripts/setup.sh installs (2.13.0, the CPU one without a GPU):
# nodes keep their own torch, and this script checks the Python libraries longctx reaches into.
set -euo pipefail
cd "$(dirname "$0")/.."
SETS=("$@")
[ ${#SETS[@]} -gt 0 ] || SETS=(newest oldest)
for s in "${SETS[@]}"; do
  case "$s" in newest|oldest) ;; *) echo "compat: unknown set '$s'; valid choices: newest, oldest" >&2; exit 2;; esac
done

# `name spec` per dependency of pyproject.toml (torch left out), read by Python's own TOML parser.
deps() {
  python3 - <<'PY'
import re, tomllib
for req in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name, spec = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", req).groups()
    if name != "torch":
        print(name, spec.replace(" ", ""))
PY
}

# The requirement that set `$1` asks for: newest = the name alone (upgraded past our bounds),
# oldest = the lower bound pinned (`>=X` or `==X`).
requirement() {
  local set=$1 name=$2 spec=$3 low
  if [ "$set" = newest ]; then echo "$name"; return; fi
  low=$(sed -nE 's/.*(>=|==)([^,]+).*/\2/p' <<<"$spec")
  if [ -n "$low" ]; then echo "$name==$low"; else echo "$name"; fi
}

declare -A RESULT
for set in "${SETS[@]}"; do
  venv=".compat/$set"
  echo "compat: [$set] setting up $venv"
  mkdir -p .compat
  if ! LONGCTX_VENV="$venv" bash scripts/setup.sh >"$venv.setup.log" 2>&1; then
    tail -n 5 "$venv.setup.log" >&2
    RESULT[$set]="could not set up: see $venv.setup.log"
    continue
  fi
  reqs=()
  while read -r name spec; do reqs+=("$(requirement "$set" "$name" "$spec")"); done < <(deps)
  extra=()
  [ "$set" = newest ] && extra=(--upgrade)
  # pip warns that the newest releases fall outside longctx's own bounds: that is the point here.
  if ! "$venv/bin/python" -m pip install -q "${extra[@]}" "${reqs[@]}" 2>"$venv.pip.log"; then
    tail -n 5 "$venv.pip.log" >&2
    RESULT[$set]="could not install (${reqs[*]}): see $venv.pip.log"
    continue
  fi
  versions=$("$venv/bin/python" - <<'PY'
import importlib.metadata as m
print(" ".join(f"{n} {m.version(n)}" for n in ("torch", "transformers", "peft", "lm-eval", "accelerate", "datasets")))
PY
)
  echo "compat: [$set] $versions"
  if HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$venv/bin/python" -m pytest -q -n 2 --dist loadfile -m "not slow" \
      -p no:cacheprovider >"$venv.pytest.log" 2>&1; then
    RESULT[$set]="passed: $versions ($(tail -n 1 "$venv.pytest.log"))"
  else
    grep -E "^(FAILED|ERROR)" "$venv.pytest.log" | head -n 20 >&2 || true
    RESULT[$set]="FAILED: $versions ($(tail -n 1 "$venv.pytest.log"); log: $venv.pytest.log)"
  fi
done

status=0
for set in "${SETS[@]}"; do
  echo "compat: $set: ${RESULT[$set]}"
  [[ "${RESULT[$set]}" == passed:* ]] || status=1
done
exit $status
