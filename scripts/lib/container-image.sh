# shellcheck shell=bash
# Sourced by scripts/test.sh: makes sure podman and runc can run containers here, and builds
# the image the container test runs (chatfleet/tests/image.rs), exported as CHATFLEET_TEST_IMAGE.
# Needs apt_install from test-servers.sh. Callers run with `set -euo pipefail`.

readonly CONTAINERS_CONF=/etc/containers/containers.conf

# podman and runc from Debian, and podman set to use them: runc rather than crun (which fails
# on kernels with hybrid cgroups), and limits the container runtime can set without a
# privileged parent. An existing containers.conf is left alone unless it already says runc.
container_engine_install() {
  PATH="$PATH:/usr/sbin"
  if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
    apt_install podman runc
  fi
  if ! grep -qs '^runtime *= *"runc"' "$CONTAINERS_CONF"; then
    [[ -e "$CONTAINERS_CONF" ]] &&
      test_servers_die "$CONTAINERS_CONF exists without runtime = \"runc\": add it under [engine] (and default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"] under [containers])"
    printf '==> configuring podman (%s)\n' "$CONTAINERS_CONF" >&2
    mkdir -p "$(dirname "$CONTAINERS_CONF")"
    printf '%s\n' '[containers]' 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]' '' \
      '[engine]' 'runtime = "runc"' >"$CONTAINERS_CONF"
  fi
}

# Builds the test image (the image-test profile: see Cargo.toml) and exports its name.
container_test_image() {
  CHATFLEET_TEST_IMAGE=localhost/chatfleet:test
  deploy/build-image.sh --profile image-test --tag "$CHATFLEET_TEST_IMAGE" --engine podman
  # The image it replaced, if any, is left untagged: remove it, so that runs do not pile up images.
  podman image prune -f >/dev/null
  export CHATFLEET_TEST_IMAGE
}
