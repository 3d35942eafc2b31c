#!/usr/bin/env bash
# Make a container base image without a registry: debootstrap a Debian rootfs with
# what the builder image expects of its base (python3 >= 3.11 with headers, venv and pip, a C++
# compiler, make, binutils, CA certificates), then `podman import` it.
#
#   tools/make_base_image.sh [IMAGE] [SUITE]      default: flash-attn-base:bookworm bookworm
#
# Needs root, debootstrap and podman (apt-get install debootstrap podman runc). The
# mirror is the first Debian URI in this machine's apt sources (deb.debian.org if none).
set -euo pipefail

image="${1:-flash-attn-base:bookworm}"
suite="${2:-bookworm}"
engine="${ENGINE:-podman}"

for tool in debootstrap "$engine"; do
  if ! command -v "$tool" >/dev/null; then
    echo "error: $tool is not installed; apt-get install debootstrap podman runc" >&2
    exit 2
  fi
done
if [ "$(id -u)" -ne 0 ]; then
  echo "error: debootstrap needs root (run this as root or through sudo)" >&2
  exit 2
fi

mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
  | grep -E '^[[:space:]]*(deb|URIs:)' | grep -oE 'https?://[^ ]+/debian/?' | head -n 1 || true)"
mirror="${mirror:-http://deb.debian.org/debian}"

rootfs="$(mktemp -d /var/tmp/flash-attn-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap $suite from $mirror into $rootfs"
debootstrap --variant=minbase \
  --include=python3,python3-dev,python3-venv,python3-pip,g++,make,binutils,ca-certificates \
  "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
  echo "error: debootstrap failed; last lines of $rootfs.log:" >&2
  tail -n 20 "$rootfs.log" >&2
  exit 1
}
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "$engine" import - "$image" >/dev/null
rm -f "$rootfs.log"
echo "$image: $("$engine" image inspect --format '{{.Size}}' "$image") bytes"
