#!/usr/bin/env bash
# Rewrites the expected output in tests/slt/*.slt with what this build returns, then shows
# what changed. Review the diff before committing it: a changed result is a changed
# behaviour. `--check` fails (exit 1) when regenerating would change a file (CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
SLUICE_SLT_REGENERATE=1 cargo test --locked -p sluice-tests --test slt -- --quiet
if [[ "${1:-}" == "--check" ]]; then
    if ! git diff --exit-code --stat -- tests/slt; then
        echo "regenerating tests/slt changed the files above: their expected output is stale" >&2
        git diff -- tests/slt >&2
        exit 1
    fi
else
    git diff --stat -- tests/slt
fi
