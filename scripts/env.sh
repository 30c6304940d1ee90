# Shared settings for scripts/: one cargo profile (release) everywhere, and a target
# directory outside the clone so repeated runs (and CI clones) stay warm.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/readstate-target}"
export CARGO_PROFILE_FLAG="--release"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
READSTATE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export READSTATE_ROOT

# Install the Debian packages the build needs, once.
ensure_build_deps() {
  local missing=()
  for p in libclang-dev clang pkg-config libssl-dev libsasl2-dev cmake; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# PostgreSQL: install Debian's package if missing, then run a private server (its own data
# directory, a free loopback port, trust auth) as the postgres user. Exports DATABASE_URL
# and READSTATE_TEST_DATABASE_URL; stop it with stop_private_postgres.
ensure_postgres() {
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "==> installing postgresql"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
  fi
  PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
  export PG_BIN
}

# Run a command as the user that owns the private cluster (postgres refuses to run as root).
as_pg_user() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

start_private_postgres() {
  ensure_postgres
  PG_DATA="$(mktemp -d /tmp/readstate-pg.XXXXXX)"
  [ "$(id -u)" -eq 0 ] && chown postgres: "$PG_DATA"
  PG_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  as_pg_user "$PG_BIN/initdb" -D "$PG_DATA/data" -U postgres --auth=trust -E UTF8 >/dev/null
  as_pg_user "$PG_BIN/pg_ctl" -D "$PG_DATA/data" -l "$PG_DATA/server.log" -w -t 60 \
    -o "-p $PG_PORT -k $PG_DATA -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null
  export PG_DATA PG_PORT
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  export READSTATE_TEST_DATABASE_URL="$DATABASE_URL"
  echo "==> private PostgreSQL on 127.0.0.1:$PG_PORT (data in $PG_DATA)"
}

stop_private_postgres() {
  if [ -n "${PG_DATA:-}" ] && [ -d "$PG_DATA/data" ]; then
    as_pg_user "$PG_BIN/pg_ctl" -D "$PG_DATA/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_DATA"
  fi
}
