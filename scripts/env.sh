# Shared settings for scripts/: one cargo profile (release) everywhere, and a target
# directory outside the clone so repeated runs (and CI clones) stay warm.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/readstate-target}"
export CARGO_PROFILE_FLAG="--release"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
READSTATE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export READSTATE_ROOT

# Install the Debian packages given that are missing (without recommends), once.
ensure_packages() {
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# The Debian packages the build needs.
ensure_build_deps() {
  ensure_packages libclang-dev clang pkg-config libssl-dev libsasl2-dev cmake
}

# What the tests use besides the build: promtool (checks /metrics, from Debian's prometheus),
# openssl (the private PostgreSQL's TLS certificates) and dclint (validates
# docker/compose.yaml against the Compose specification without a Docker engine; from npm,
# into a cache outside the clone), and schemathesis (property-based tests of the read API
# against docs/openapi.yaml; from PyPI, into a virtualenv in the same cache). Exports
# READSTATE_DCLINT and READSTATE_SCHEMATHESIS.
DCLINT_VERSION=3.1.0
SCHEMATHESIS_VERSION=4.32.5
ensure_test_tools() {
  ensure_packages prometheus openssl
  command -v npm >/dev/null 2>&1 || ensure_packages nodejs npm
  local tools="$HOME/.cache/readstate-tools"
  if [ ! -x "$tools/node_modules/.bin/dclint" ]; then
    echo "==> installing dclint $DCLINT_VERSION (npm)"
    mkdir -p "$tools"
    npm install --silent --no-audit --no-fund --prefix "$tools" "dclint@$DCLINT_VERSION" >/dev/null
  fi
  export READSTATE_DCLINT="$tools/node_modules/.bin/dclint"
  local st="$tools/schemathesis"
  if ! "$st/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    echo "==> installing schemathesis $SCHEMATHESIS_VERSION (PyPI)"
    python3 -c "import ensurepip" 2>/dev/null || ensure_packages python3-venv
    python3 -m venv "$st"
    "$st/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
  fi
  export READSTATE_SCHEMATHESIS="$st/bin/schemathesis"
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
  private_postgres_tls
  as_pg_user "$PG_BIN/pg_ctl" -D "$PG_DATA/data" -l "$PG_DATA/server.log" -w -t 60 \
    -o "-p $PG_PORT -k $PG_DATA -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c ssl=on -c ssl_cert_file=$PG_DATA/tls/server.crt -c ssl_key_file=$PG_DATA/tls/server.key" \
    start >/dev/null
  export PG_DATA PG_PORT
  # The CA that signed the server's certificate (for localhost only), for sslmode tests.
  export READSTATE_TEST_PG_CA="$PG_DATA/tls/ca.crt"
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  export READSTATE_TEST_DATABASE_URL="$DATABASE_URL"
  echo "==> private PostgreSQL on 127.0.0.1:$PG_PORT (data in $PG_DATA)"
}

# A CA and a server certificate for "localhost" (not 127.0.0.1), so that the tests can tell
# verify-full from verify-ca.
private_postgres_tls() {
  local d="$PG_DATA/tls"
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=readstate test CA" \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\n' > "$d/ext.cnf"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 2 -extfile "$d/ext.cnf" -out "$d/server.crt" 2>/dev/null
  chmod 600 "$d/server.key"
  [ "$(id -u)" -eq 0 ] && chown -R postgres: "$d"
  chmod 644 "$d/ca.crt"
}

stop_private_postgres() {
  if [ -n "${PG_DATA:-}" ] && [ -d "$PG_DATA/data" ]; then
    as_pg_user "$PG_BIN/pg_ctl" -D "$PG_DATA/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_DATA"
  fi
}

# Apache Kafka (KRaft, one node) from Maven Central: jars cached once outside the clone.
KAFKA_VERSION="4.1.1"
ensure_kafka_jars() {
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
    echo "==> installing Java and Maven"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
  fi
  KAFKA_JARS="${READSTATE_BROKER_CACHE:-$HOME/.cache/readstate-kafka}/$KAFKA_VERSION"
  if [ ! -f "$KAFKA_JARS/.complete" ]; then
    echo "==> resolving Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_JARS"
    rm -rf "$KAFKA_JARS"
    mkdir -p "$KAFKA_JARS"
    mvn -q -B -Dstyle.color=never -f "$READSTATE_ROOT/scripts/kafka-broker/pom.xml" \
      -Dkafka.version="$KAFKA_VERSION" dependency:copy-dependencies \
      -DoutputDirectory="$KAFKA_JARS" -DincludeScope=runtime
    touch "$KAFKA_JARS/.complete"
  fi
  export KAFKA_JARS
}

# The Kafka Streams yardstick of bench/kafka-streams, built with Maven (a JDK is installed
# when missing). Exports YARDSTICK_CLASSPATH: a file with its dependencies' classpath (the
# classes are in the directory next to it).
build_yardstick() {
  ensure_kafka_jars
  if ! command -v javac >/dev/null 2>&1; then
    echo "==> installing a JDK"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq openjdk-17-jdk-headless >/dev/null
  fi
  echo "==> building the Kafka Streams yardstick (bench/kafka-streams)"
  mvn -q -B -Dstyle.color=never -f "$READSTATE_ROOT/bench/kafka-streams/pom.xml" -DskipTests \
    package dependency:build-classpath -Dmdep.outputFile=target/classpath.txt
  export YARDSTICK_CLASSPATH="$READSTATE_ROOT/bench/kafka-streams/target/classpath.txt"
}

# The Sarama (Go) producer of bench/sarama-producer, for the tests that need events produced
# the way Go services produce them. Exports READSTATE_SARAMA_PRODUCER (its binary).
build_sarama_producer() {
  if ! command -v go >/dev/null 2>&1; then
    echo "==> installing Go"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq golang-go >/dev/null
  fi
  echo "==> building the Sarama producer (bench/sarama-producer)"
  (cd "$READSTATE_ROOT/bench/sarama-producer" && go build -o target/sarama-producer .)
  export READSTATE_SARAMA_PRODUCER="$READSTATE_ROOT/bench/sarama-producer/target/sarama-producer"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Start a broker in a temporary directory; exports KAFKA_BROKERS, KAFKA_RUN (its directory)
# and READSTATE_TEST_KAFKA (for the real-broker tests).
start_private_kafka() {
  ensure_kafka_jars
  KAFKA_RUN="$(mktemp -d /tmp/readstate-kafka.XXXXXX)"
  local bport cport
  bport="$(free_port)"
  cport="$(free_port)"
  cat > "$KAFKA_RUN/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$bport,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$bport
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$KAFKA_RUN/data
auto.create.topics.enable=false
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.consumer.min.session.timeout.ms=3000
group.classic.min.session.timeout.ms=3000
# The consumer group protocol (KIP-848) as readstate's classic settings: a 10 s session,
# heartbeats every second (the broker's defaults are 45 s and 5 s).
group.consumer.session.timeout.ms=10000
group.consumer.min.heartbeat.interval.ms=500
group.consumer.heartbeat.interval.ms=1000
# Compaction that really runs in a test: segments roll every second, the cleaner looks
# every 200 ms and cleans as soon as anything is dirty.
log.roll.ms=1000
log.cleaner.backoff.ms=200
log.cleaner.min.cleanable.ratio=0.01
log.cleaner.min.compaction.lag.ms=0
log.cleaner.dedupe.buffer.size=16777216
log.retention.check.interval.ms=1000
PROPS
  local cp="$KAFKA_JARS/*"
  local id
  id="$(java -cp "$cp" kafka.tools.StorageTool random-uuid)"
  java -cp "$cp" kafka.tools.StorageTool format -t "$id" -c "$KAFKA_RUN/server.properties" >"$KAFKA_RUN/format.log" 2>&1
  nohup java -Xms256m -Xmx768m -XX:+UseG1GC -cp "$cp" kafka.Kafka "$KAFKA_RUN/server.properties" \
    >"$KAFKA_RUN/server.log" 2>&1 &
  echo $! >"$KAFKA_RUN/pid"
  local deadline=$((SECONDS + 90))
  until python3 - "$bport" <<'PY' 2>/dev/null
import socket, struct, sys
# An ApiVersions request: the broker answers once it serves clients.
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
body = struct.pack(">hhih", 18, 0, 1, 4) + b"wait"
s.sendall(struct.pack(">i", len(body)) + body)
n = struct.unpack(">i", s.recv(4))[0]
assert n > 0
PY
  do
    if [ "$SECONDS" -ge "$deadline" ] || ! kill -0 "$(cat "$KAFKA_RUN/pid")" 2>/dev/null; then
      echo "Kafka did not start; its log:" >&2
      tail -40 "$KAFKA_RUN/server.log" >&2
      return 1
    fi
    sleep 0.5
  done
  export KAFKA_RUN
  export KAFKA_BROKERS="127.0.0.1:$bport"
  export READSTATE_TEST_KAFKA="$KAFKA_BROKERS"
  echo "==> private Apache Kafka $KAFKA_VERSION on $KAFKA_BROKERS (data in $KAFKA_RUN)"
}

stop_private_kafka() {
  if [ -n "${KAFKA_RUN:-}" ] && [ -f "$KAFKA_RUN/pid" ]; then
    local pid
    pid="$(cat "$KAFKA_RUN/pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -rf "$KAFKA_RUN"
  fi
}
