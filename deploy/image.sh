#!/usr/bin/env bash
# Build the gateway image: `make image` (TARGET=cpu, the default, or gpu).
#
#   deploy/image.sh engine       install podman, runc and slirp4netns where no engine is (Debian's)
#   deploy/image.sh base         make sure the Dockerfile's base image is there: pulled, or a
#                                stand-in made with debootstrap where no registry answers
#   deploy/image.sh build        base, then build TARGET as IMAGE (prints IMAGE on its last line)
#   deploy/image.sh context DIR TAG
#                                base, then build DIR's Dockerfile on it as TAG, pip reaching the
#                                index as for the gateway (the tests' Triton stand-in)
#
# Settings (environment): ENGINE (podman or docker; default: whichever is installed, podman
# first), TARGET, OPENVINO (non-empty: with the OpenVINO engine, --build-arg OPENVINO=1),
# IMAGE (default resnet-serving:<version>[-gpu][-openvino]), MIRROR (the Debian mirror for
# the stand-in; default: the machine's own apt source).
#
# podman runs with deploy/podman/containers.conf unless CONTAINERS_CONF says otherwise: the
# build machines' kernels need runc and lower rlimits (the file says why).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "image: $*" >&2; exit 1; }

engine_name() {
	if [ -n "${ENGINE:-}" ]; then echo "$ENGINE"
	elif command -v podman >/dev/null; then echo podman
	# A docker CLI without a daemon to talk to (as on the build machines) is no engine.
	elif command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then echo docker
	fi
}

# Debian's packages for what is missing (root, apt-get), else a one-line refusal.
apt_install() {
	local missing=()
	for pkg in "$@"; do command -v "$pkg" >/dev/null || missing+=("$pkg"); done
	[ ${#missing[@]} -eq 0 ] && return
	command -v apt-get >/dev/null || die "needs ${missing[*]} on PATH (Debian: apt-get install ${missing[*]})"
	export DEBIAN_FRONTEND=noninteractive
	# The package lists may be missing or stale on a fresh machine: update once, then install.
	apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } \
		|| die "apt-get could not install ${missing[*]}"
}

case "${1:-build}" in
	engine | base | build) ;;
	context) [ $# -eq 3 ] && [ -f "$2/Dockerfile" ] \
		|| die "usage: deploy/image.sh context DIR TAG (DIR holds a Dockerfile)" ;;
	*) die "usage: deploy/image.sh [engine|base|build|context DIR TAG]" ;;
esac

ENGINE=$(engine_name)
if [ "${ENGINE:-podman}" = podman ]; then
	# runc: deploy/podman/containers.conf names it; slirp4netns: the tests reach containers
	# through its port handler, on loopback (tests/helpers/containers.py says why).
	apt_install podman runc slirp4netns
	ENGINE=podman
	export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}
fi
command -v "$ENGINE" >/dev/null || die "ENGINE=$ENGINE is not installed"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
TARGET=${TARGET:-cpu}
case "$TARGET" in
	cpu) IMAGE=${IMAGE:-resnet-serving:$VERSION${OPENVINO:+-openvino}} ;;
	gpu) IMAGE=${IMAGE:-resnet-serving:$VERSION-gpu${OPENVINO:+-openvino}} ;;
	*) die "TARGET must be cpu or gpu, not '$TARGET'" ;;
esac
BASE=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
[ -n "$BASE" ] || die "the Dockerfile names no default PYTHON_IMAGE"

debian_mirror() {
	if [ -n "${MIRROR:-}" ]; then echo "$MIRROR"; return; fi
	local uri
	uri=$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
	echo "${uri:-http://deb.debian.org/debian}"
}

# The stand-in for python:3.11-slim-bookworm: Debian bookworm's own Python 3.11 (python.org's
# 3.11.x in the official image), with what the Dockerfile uses (venv, groupadd/useradd,
# CA certificates). Labelled, so nobody mistakes it for the official image.
make_stand_in() {
	apt_install debootstrap
	local root
	root=$(mktemp -d /var/tmp/image-base.XXXXXX)
	trap 'rm -rf "$root"' EXIT
	echo "image: $BASE cannot be pulled; making a stand-in with debootstrap ($(debian_mirror))" >&2
	debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
		bookworm "$root" "$(debian_mirror)" >"$root.log" 2>&1 \
		|| { tail -5 "$root.log" >&2; rm -f "$root.log"; die "debootstrap failed"; }
	rm -f "$root.log"
	rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
		"$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/locale
	tar -C "$root" -c . | "$ENGINE" import \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'ENV LANG=C.UTF-8' \
		--change 'LABEL org.opencontainers.image.description="stand-in for '"$BASE"': debootstrap bookworm minbase + python3"' \
		--change 'CMD ["python3"]' \
		- "$BASE" >/dev/null
	rm -rf "$root"
	trap - EXIT
}

ensure_base() {
	"$ENGINE" image inspect "$BASE" >/dev/null 2>&1 && return
	# No registry may be reachable: a pull that hangs must not hold the build for long.
	timeout 120 "$ENGINE" pull -q "docker.io/library/$BASE" >/dev/null 2>&1 \
		&& "$ENGINE" tag "docker.io/library/$BASE" "$BASE" && return
	make_stand_in
}

# pip inside the build reaches the package index as this machine's pip does: its index
# URLs, trusted hosts and CA bundle (a TLS-inspecting proxy's CA, for one) go in as build
# secrets, mounted only while pip runs and never stored in a layer. Local (file:) indexes
# and find-links are left out: the build cannot see this machine's disk.
pip_secrets() {
	local dir=$1 cert
	python3 - "$dir" <<-'PY'
	import configparser, subprocess, sys
	out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
	seen = {}
	for line in out.splitlines():
	    key, _, value = line.partition("=")
	    scope, _, name = key.rpartition(".")
	    if name in seen and scope != ":env:":
	        continue
	    seen[name] = value.strip("'")
	conf = configparser.ConfigParser()
	conf["global"] = {}
	for name in ("index-url", "extra-index-url", "trusted-host"):
	    urls = [u for u in seen.get(name, "").split() if not u.startswith("file:")]
	    if urls:
	        conf["global"][name] = " ".join(urls)
	if seen.get("cert"):
	    conf["global"]["cert"] = "/run/secrets/pip-ca.crt"
	    print(seen["cert"])
	with open(sys.argv[1] + "/pip.conf", "w") as f:
	    conf.write(f)
	PY
}

# `build` with pip's access: engine build ARGS... (the context last).
build_with_pip() {
	local args=() cert
	# podman's default (OCI) format drops HEALTHCHECK.
	[ "$ENGINE" = podman ] && args+=(--format docker)
	secrets=$(mktemp -d)  # global: the EXIT trap runs after this function returns
	trap 'rm -rf "$secrets"' EXIT
	cert=$(pip_secrets "$secrets")
	args+=(--secret "id=pip.conf,src=$secrets/pip.conf")
	[ -n "$cert" ] && args+=(--secret "id=pip-ca.crt,src=$cert")
	# The host's network, for pip.
	"$ENGINE" build "${args[@]}" --network host "$@" >&2
}

build() {
	local old
	ensure_base
	old=$("$ENGINE" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
	build_with_pip --target "$TARGET" --build-arg "VERSION=$VERSION" \
		${OPENVINO:+--build-arg OPENVINO=1} -t "$IMAGE" .
	# The image this one replaces (its copy of the venv is hundreds of MB), unless it is
	# still in use; the builder stages stay, as the next build's cache.
	if [ -n "$old" ] && [ "$old" != "$("$ENGINE" image inspect --format '{{.Id}}' "$IMAGE")" ]; then
		"$ENGINE" rmi "$old" >/dev/null 2>&1 || true
	fi
	echo "$IMAGE"
}

case "${1:-build}" in
	engine) ;;
	base) ensure_base ;;
	build) build ;;
	context)
		ensure_base
		build_with_pip -t "$3" "$2"
		echo "$3" ;;
esac
