#!/usr/bin/env bash
# Checks the rules of docs/architecture.md that the compiler does not:
#  1. crate arrows point down: server → sql, connectors → engine (a crate depends only on
#     crates below it; sql and connectors know nothing of each other);
#  2. the server names no connector: no connector module, config variant or connector type in
#     server/src (it reaches connectors through the registry and the engine's traits);
#  3. the engine's and the SQL layer's tests build without librdkafka or the AWS SDK (the
#     heavy connectors are cargo features of sluice-connectors).
set -euo pipefail
cd "$(dirname "$0")/.."
failed=0

# 1. Each crate's sluice dependencies must be below it.
declare -A allowed=(
  [engine]=""
  [connectors]="sluice-engine"
  [sql]="sluice-engine"
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

# 3. No heavy connector dependency under the engine or the SQL layer, tests included.
for crate in sluice-engine sluice-sql; do
  if ! tree=$(cargo tree --locked -p "$crate" -e normal,dev --prefix none); then
    echo "check-architecture: cannot list the dependencies of $crate" >&2
    failed=1
    continue
  fi
  heavy=$(grep -E '^(rdkafka|aws-sdk-[a-z]+|aws-config) ' <<<"$tree" | sort -u || true)
  if [ -n "$heavy" ]; then
    echo "check-architecture: $crate (tests included) depends on heavy connector crates:" >&2
    echo "$heavy" >&2
    failed=1
  fi
done

if [ "$failed" = 0 ]; then
  echo "check-architecture: crate arrows point down; server/src names no connector;" \
    "engine and sql build without librdkafka or the AWS SDK"
fi
exit "$failed"
