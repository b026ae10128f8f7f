#!/usr/bin/env bash
# Checks the two rules of docs/architecture.md that the compiler does not:
#  1. crate arrows point down: server → sql → connectors → engine (a crate depends only on
#     crates below it);
#  2. the server names no connector: no connector module, config variant or connector type in
#     server/src (it reaches connectors through the registry and the engine's traits).
set -euo pipefail
cd "$(dirname "$0")/.."
failed=0

# 1. Each crate's sluice dependencies must be below it.
declare -A allowed=(
  [engine]=""
  [connectors]="sluice-engine"
  [sql]="sluice-engine sluice-connectors"
  [server]="sluice-engine sluice-connectors sluice-sql"
)
for crate in engine connectors sql server; do
  # [dependencies] only: tests and benchmarks may use anything.
  deps=$(awk '/^\[/{section=$0} section=="[dependencies]" && /^sluice-/{print $1}' "$crate/Cargo.toml")
  for dep in $deps; do
    case " ${allowed[$crate]} " in
      *" $dep "*) ;;
      *) echo "check-architecture: $crate depends on $dep, which is not below it" >&2; failed=1 ;;
    esac
  done
done

# 2. Connector names in the server's code (comments aside).
pattern='sluice_connectors::(http|kafka|kinesis|s3|datagen)\b|\b(SourceConfig|SinkConfig)::[A-Z]|\bHttpIngest\b|\b(Kafka|Kinesis|Datagen|S3)[A-Z][A-Za-z]*\b'
if hits=$(grep -rnE --include='*.rs' "$pattern" server/src | grep -vE '^[^:]+:[0-9]+:\s*//'); then
  echo "check-architecture: server/src names a connector (go through the registry or an engine trait):" >&2
  echo "$hits" >&2
  failed=1
fi

if [ "$failed" = 0 ]; then
  echo "check-architecture: crate arrows point down; server/src names no connector"
fi
exit "$failed"
