#!/usr/bin/env bash
# Sluice's whole test suite, on a fresh machine: installs the clients the tests use, starts
# the services they talk to (scripts/services.sh: a Kafka-protocol broker, a schema registry, an
# S3 + SQS server and a Kinesis server on 127.0.0.1; stopped on exit), then checks formatting and lints and runs every test (unit, .slt, end-to-end over
# real sockets with tokio-postgres, psql, pgJDBC, Python drivers, HTTP, Kafka clients and
# Parquet readers).
#
#   scripts/test.sh
#
# Dependencies are compiled into a persistent target directory (default
# ~/.cache/sluice/target; override with CARGO_TARGET_DIR) so fresh clones build only
# Sluice's own crates.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

say() { printf '\n== %s\n' "$*"; }

need_psql() {
  command -v psql >/dev/null 2>&1 && return 0
  say "installing the PostgreSQL client (psql)"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq postgresql-client >/dev/null
  fi
  command -v psql >/dev/null 2>&1 || { echo "psql is required by the tests: install the PostgreSQL client" >&2; exit 1; }
}

# pgJDBC (Debian's libpostgresql-jdbc-java) and a JDK to compile the JDBC client session.
PGJDBC_JAR="${SLUICE_PGJDBC_JAR:-/usr/share/java/postgresql.jar}"
need_pgjdbc() {
  command -v javac >/dev/null 2>&1 && [ -f "$PGJDBC_JAR" ] && return 0
  say "installing pgJDBC and a JDK (libpostgresql-jdbc-java, default-jdk-headless)"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libpostgresql-jdbc-java default-jdk-headless >/dev/null
  fi
  command -v javac >/dev/null 2>&1 && [ -f "$PGJDBC_JAR" ] || {
    echo "pgJDBC and javac are required by the tests: install libpostgresql-jdbc-java and a JDK" >&2
    exit 1
  }
}

# promtool (Debian's prometheus package) for the alert rules' unit tests.
need_promtool() {
  command -v promtool >/dev/null 2>&1 && return 0
  say "installing promtool (prometheus)"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  command -v promtool >/dev/null 2>&1 || { echo "promtool is required by the tests: install Debian's prometheus package" >&2; exit 1; }
}

# openssl (the security tests make a CA and a server certificate) and curl (HTTPS client).
need_openssl_curl() {
  command -v openssl >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 && return 0
  say "installing openssl and curl"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq openssl curl >/dev/null
  fi
  command -v openssl >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 || {
    echo "openssl and curl are required by the tests: install them" >&2
    exit 1
  }
}

need_psql
need_pgjdbc
need_promtool
need_openssl_curl
export SLUICE_TEST_PGJDBC_JAR="$PGJDBC_JAR"

say "services (Kafka-protocol broker, schema registry, S3 + SQS, Kinesis)"
trap 'scripts/services.sh stop' EXIT
# (Not `eval "$(…)"`: that would run on after a service failed to start.)
if ! services_env="$(scripts/services.sh start)"; then
  echo "test.sh: a service did not start (its name and log are above); stopping" >&2
  exit 1
fi
eval "$services_env"

say "architecture (crate arrows point down; the server names no connector)"
scripts/check-architecture.sh
say "rustfmt"
cargo fmt --all -- --check

say "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "docs (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

say "alert rules (promtool)"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml

say "tests"
cargo test --workspace --locked
say ".slt expected output (regenerating it must change nothing)"
scripts/regenerate-slt.sh --check

say "all checks passed"
