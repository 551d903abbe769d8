#!/usr/bin/env bash
# Start the real servers the `services` tests (tests/scale) need, on 127.0.0.1 only:
#   * PostgreSQL (Debian's package; installed with apt-get when missing and we are root),
#     a fresh cluster under $LMLAB_SERVICES_DIR run by the `postgres` user, password auth;
#   * `mlflow server` on that PostgreSQL with served artifacts (--artifacts-destination).
# Idempotent: a service that already answers is reused. Writes the URLs to
# $LMLAB_SERVICES_DIR/services.env (read by tests/scale/conftest.py) and prints them.
# Stop everything with:  scripts/ci_services.sh stop
set -euo pipefail

DIR=${LMLAB_SERVICES_DIR:-/tmp/lmlab-services}
PG_PORT=${LMLAB_PG_PORT:-55432}
MLFLOW_PORT=${LMLAB_MLFLOW_PORT:-55000}
# A throwaway password for a loopback-only test cluster (never a real secret).
PG_PASSWORD=${LMLAB_PG_PASSWORD:-lmlab-ci-only}
ENV_FILE="$DIR/services.env"
PG_DATA="$DIR/pg"
PG_SOCKETS="$DIR/sockets"

pg_bin() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
    [ -n "$found" ] && echo "$found"
}

as_postgres() {
    if [ "$(id -un)" = postgres ]; then "$@"; else su postgres -s /bin/bash -c "$(printf '%q ' "$@")"; fi
}

if [ "${1:-}" = stop ]; then
    if [ -f "$DIR/mlflow.pid" ]; then kill "$(cat "$DIR/mlflow.pid")" 2>/dev/null || true; rm -f "$DIR/mlflow.pid"; fi
    BIN=$(pg_bin || true)
    if [ -n "$BIN" ] && [ -d "$PG_DATA" ]; then as_postgres "$BIN/pg_ctl" -D "$PG_DATA" -m fast stop || true; fi
    exit 0
fi

BIN=$(pg_bin || true)
if [ -z "$BIN" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ci_services: PostgreSQL is not installed (apt-get install -y postgresql, as root)" >&2
        exit 3
    fi
    echo "ci_services: installing PostgreSQL from the distribution's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq postgresql >/dev/null
    BIN=$(pg_bin)
fi

mkdir -p "$DIR" "$PG_SOCKETS" "$DIR/artifacts" "$DIR/pglog"
chmod 755 "$DIR"
id postgres >/dev/null 2>&1 || useradd --system --home "$DIR" postgres
chown postgres "$PG_SOCKETS" "$DIR/pglog"

if ! as_postgres "$BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    if [ ! -f "$PG_DATA/PG_VERSION" ]; then
        rm -rf "$PG_DATA"
        mkdir -p "$PG_DATA"
        chown postgres "$PG_DATA"
        printf '%s\n' "$PG_PASSWORD" > "$DIR/pwfile"
        chown postgres "$DIR/pwfile"
        as_postgres "$BIN/initdb" -D "$PG_DATA" -U postgres --pwfile="$DIR/pwfile" \
            --auth-host=scram-sha-256 --auth-local=trust >"$DIR/initdb.log" 2>&1
        rm -f "$DIR/pwfile"
    fi
    as_postgres "$BIN/pg_ctl" -D "$PG_DATA" -l "$DIR/pglog/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_SOCKETS -c max_connections=200 -c fsync=off" \
        start >/dev/null
fi

export PGPASSWORD="$PG_PASSWORD"
PSQL=("$BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA)
if [ "$("${PSQL[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'lmlab_mlflow'")" != 1 ]; then
    "${PSQL[@]}" -c "CREATE DATABASE lmlab_mlflow" >/dev/null
fi

PG_URL="postgresql://postgres:${PG_PASSWORD}@127.0.0.1:${PG_PORT}"
MLFLOW_URL="http://127.0.0.1:${MLFLOW_PORT}"
healthy() { python - "$MLFLOW_URL/health" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=3).read()
EOF
}
if ! healthy; then
    LITELLM_LOCAL_MODEL_COST_MAP=True nohup mlflow server \
        --backend-store-uri "$PG_URL/lmlab_mlflow" --artifacts-destination "$DIR/artifacts" \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2 >"$DIR/mlflow.log" 2>&1 &
    echo $! > "$DIR/mlflow.pid"
    for _ in $(seq 1 120); do healthy && break; kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null || break; sleep 1; done
    healthy || { echo "ci_services: mlflow server did not start; see $DIR/mlflow.log" >&2; tail -20 "$DIR/mlflow.log" >&2; exit 4; }
fi

cat > "$ENV_FILE" <<EOF
LMLAB_PG_URL=$PG_URL
LMLAB_PG_BIN=$BIN
LMLAB_MLFLOW_URL=$MLFLOW_URL
LMLAB_MLFLOW_BACKEND=$PG_URL/lmlab_mlflow
LMLAB_ARTIFACTS_DIR=$DIR/artifacts
EOF
echo "ci_services: PostgreSQL at 127.0.0.1:$PG_PORT (user postgres, password in \$PGPASSWORD for tests)"
echo "ci_services: MLflow tracking server at $MLFLOW_URL (backend lmlab_mlflow, artifacts $DIR/artifacts)"
echo "ci_services: wrote $ENV_FILE:"
sed 's/:[^:@]*@/:***@/' "$ENV_FILE"
