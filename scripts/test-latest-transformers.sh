#!/usr/bin/env bash
# Not part of CI: try the newest transformers < 6 the package index offers, run the default
# suite on it in .venv-latest, and say what breaks (failures grouped by their error line).
# CI proves the versions in prunekit/models/compat.py (TESTED); when this passes on a newer one,
# bump TRANSFORMERS_NEWEST in the Makefile, TESTED and the range in pyproject.toml together.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-latest
TORCH=${TORCH:-torch==2.13.0}
test -x $VENV/bin/python || $PYTHON -m venv $VENV
$VENV/bin/python -m pip install -q --disable-pip-version-check "$TORCH"
# the project without its transformers pin, then the newest 5.x on top
$VENV/bin/python -m pip install -q --disable-pip-version-check -e ".[assets,bench,dev,train]"
$VENV/bin/python -m pip install -q --disable-pip-version-check --no-deps $(sed -n 's/^ASSETS := //p' Makefile)
$VENV/bin/python -m pip install -q --disable-pip-version-check --upgrade "transformers<6"
version=$($VENV/bin/python -c 'import transformers; print(transformers.__version__)')
echo "transformers $version (tested: $($VENV/bin/python -c 'from prunekit.models.compat import TESTED; print(*TESTED)'))"
log=$(mktemp)
$VENV/bin/python -m pytest -q -p no:cacheprovider -W ignore::UserWarning -o addopts="-m 'not slow'" -rf \
  --deselect tests/test_compat.py::test_installed_version_is_a_tested_one | tee "$log" | tail -3
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  echo
  echo "What breaks on transformers $version (failures by error, most frequent first):"
  grep -E '^FAILED|^ERROR' "$log" | sed -E 's/^(FAILED|ERROR) [^ ]+ - //' | cut -c1-160 | sort | uniq -c | sort -rn | head -20
fi
rm -f "$log"
exit "$status"
