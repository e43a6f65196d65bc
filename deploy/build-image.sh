#!/usr/bin/env bash
# Builds the chatfleet container image (deploy/Dockerfile) around a static binary.
#
#   deploy/build-image.sh [--tag NAME] [--profile release|image-test] [--engine podman|docker]
#
# Defaults: --tag chatfleet:0.1.0, --profile release, the engine in $CONTAINER_ENGINE or podman.
# The tests build with --profile image-test (unoptimised, much quicker to compile; see
# Cargo.toml). Needs a Linux x86-64 machine with glibc's static libraries (Debian: libc6-dev),
# the CA bundle at /etc/ssl/certs/ca-certificates.crt (Debian: ca-certificates), and a
# container engine. No base image is pulled: the image is FROM scratch.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'deploy/build-image.sh: %s\n' "$*" >&2; exit 1; }

tag=chatfleet:0.1.0 profile=release engine="${CONTAINER_ENGINE:-podman}"
while (($#)); do
  case "$1" in
    --tag) tag="${2:?--tag needs a name}"; shift 2 ;;
    --profile) profile="${2:?--profile needs a name}"; shift 2 ;;
    --engine) engine="${2:?--engine needs a name}"; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
command -v "$engine" >/dev/null || die "no $engine here: install it (Debian: apt-get install podman runc)"
certs=/etc/ssl/certs/ca-certificates.crt
[[ -f "$certs" ]] || die "no CA bundle at $certs: install it (Debian: apt-get install ca-certificates)"

# A static binary: glibc linked in, so the image needs no libc. An explicit --target keeps the
# flag off build scripts and proc-macros, which must stay dynamic.
target=x86_64-unknown-linux-gnu
# A release image carries no symbols or line tables: a third of the size, and the binary never
# shows users a backtrace anyway.
if [[ "$profile" == release ]]; then
  export CARGO_PROFILE_RELEASE_STRIP=symbols
fi
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --profile "$profile" --target "$target" -p chatfleet --bin chatfleet
dir="$profile"
[[ "$profile" == dev ]] && dir=debug
binary="target/$target/$dir/chatfleet"
[[ -x "$binary" ]] || die "cargo did not produce $binary"

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/chatfleet"
cp "$certs" "$context/ca-certificates.crt"
"$engine" build --quiet -f deploy/Dockerfile -t "$tag" "$context" >/dev/null
printf '==> built %s (%s profile)\n' "$tag" "$profile"
