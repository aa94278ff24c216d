#!/usr/bin/env bash
# Interop check: the seed's Python and Go clients, generated from
# proto/graviton/proto/blob.proto with the stock tools, round-trip blobs byte-exactly
# through a real Graviton server.
#
#   scripts/interop.sh [--release]
#
# 1. makes a Python venv in .venv (reused next time) with grpcio, grpcio-tools and
#    blake3 from PyPI; if Python's venv module has no pip (Debian without
#    python3-venv), it bootstraps pip from PyPI into a venv made --without-pip;
#    installs Go, protoc and Debian's packaged gRPC-Go with apt-get if they are missing
#    (needs root; GRAVITON_INTEROP_GO=0 skips the Go client, saying so);
# 2. generates the stubs: python -m grpc_tools.protoc -I proto --python_out=OUT
#    --grpc_python_out=OUT proto/graviton/proto/blob.proto, and protoc --go_out
#    --go-grpc_out for Go; builds scripts/seed-go (GOPATH mode against Debian's
#    /usr/share/gocode: no module download);
# 3. builds the server (debug, or --release) and starts it with a fresh data directory
#    under target/, on 127.0.0.1:50051 if that port is free (the seed's address, so
#    its code runs as is), else on a free port (see scripts/seed_client.py);
# 4. runs scripts/seed_client.py: the seed's get_blob/upload_blob, verbatim, on blobs
#    of 0 B to 5 MiB, and checks the copy against shared/seed/grpc-api.md when present;
#    then scripts/seed-go: the seed's GetBlob/UploadBlob, verbatim (checked the same
#    way), on blobs of 0 B to 5 MiB, and checks that each key is the content's BLAKE3;
# 5. stops the server with SIGTERM and requires a clean exit (status 0).
#
# Needs: cargo, python3, network access to PyPI (first run) and to Debian's mirrors
# (first run, for Go). Exits non-zero on any failure. Environment:
# GRAVITON_INTEROP_VENV (default .venv), GRAVITON_SEED_DOC (default
# ../shared/seed/grpc-api.md beside the repository), GRAVITON_INTEROP_GO (default 1).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

profile=debug
cargo_profile=()
if [[ "${1:-}" == "--release" ]]; then
    profile=release
    cargo_profile=(--release)
elif [[ -n "${1:-}" ]]; then
    echo "usage: $0 [--release]" >&2
    exit 2
fi

venv="${GRAVITON_INTEROP_VENV:-$repo/.venv}"
seed_doc="${GRAVITON_SEED_DOC:-$repo/../shared/seed/grpc-api.md}"
python3_bin="$(command -v python3 || true)"
[[ -n "$python3_bin" ]] || { echo "interop: python3 is required" >&2; exit 1; }

log() { echo "interop: $*" >&2; }

# --- 1. the venv ---------------------------------------------------------------
bootstrap_pip() {
    # No ensurepip (Debian's python3 without python3-venv): fetch pip's wheel from
    # PyPI and let it install itself.
    "$venv/bin/python" - <<'PY'
import json, os, subprocess, sys, tempfile, urllib.parse, urllib.request
index = "https://pypi.org/pypi/pip/json"
info = json.load(urllib.request.urlopen(index, timeout=60))
wheel = next(f for f in info["urls"] if f["packagetype"] == "bdist_wheel")
path = os.path.join(tempfile.mkdtemp(), wheel["filename"])
urllib.request.urlretrieve(urllib.parse.urljoin(index, wheel["url"]), path)
subprocess.check_call([sys.executable, os.path.join(path, "pip"), "install", "--quiet", path])
PY
}

if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import grpc, grpc_tools, blake3' 2>/dev/null; then
    log "creating the Python venv in $venv"
    if ! "$python3_bin" -m venv "$venv" >/dev/null 2>&1; then
        log "python3 -m venv failed (no ensurepip?); bootstrapping pip from PyPI"
        rm -rf "$venv"
        "$python3_bin" -m venv --without-pip "$venv"
        bootstrap_pip
    fi
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet grpcio grpcio-tools blake3
fi
py="$venv/bin/python"

# Go, protoc and gRPC-Go from Debian. grpc-dev accepts either protobuf shim; only the
# 1.5 one (over google.golang.org/protobuf) marshals messages from today's protoc-gen-go.
go_client="${GRAVITON_INTEROP_GO:-1}"
go_packages=(golang-go protobuf-compiler libprotobuf-dev protoc-gen-go protoc-gen-go-grpc
    golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev)
go_missing() {
    local package
    for package in "${go_packages[@]}"; do
        [[ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null)" == "install ok installed" ]] \
            || return 0
    done
    return 1
}
if [[ "$go_client" == 1 ]] && go_missing; then
    if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        log "the Go client needs these Debian packages: ${go_packages[*]}"
        log "install them (as root: apt-get install ...) or set GRAVITON_INTEROP_GO=0 to skip it"
        exit 1
    fi
    log "installing Go, protoc and gRPC-Go with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${go_packages[@]}" >/dev/null
fi

# --- 2. the stubs ----------------------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/graviton-interop.XXXXXX")"
data_dir=""
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
    [[ -z "$data_dir" ]] || rm -rf "$data_dir"
}
trap cleanup EXIT

stubs="$work/stubs"
mkdir -p "$stubs"
"$py" -m grpc_tools.protoc -I proto --python_out="$stubs" --grpc_python_out="$stubs" \
    proto/graviton/proto/blob.proto
# Regular packages, so that no other `graviton` on sys.path shadows them.
touch "$stubs/graviton/__init__.py" "$stubs/graviton/proto/__init__.py"

if [[ "$go_client" == 1 ]]; then
    # GOPATH mode: graviton/proto (the seed's import path, the proto's go_package) and
    # the client beside it; every other import comes from Debian's /usr/share/gocode.
    gopath="$work/gopath"
    mkdir -p "$gopath/src/seedclient"
    protoc -I proto -I /usr/include --go_out="$gopath/src" --go-grpc_out="$gopath/src" \
        proto/graviton/proto/blob.proto
    cp scripts/seed-go/*.go "$gopath/src/seedclient/"
    log "building the seed's Go client"
    GO111MODULE=off GOFLAGS="" GOPATH="$gopath:/usr/share/gocode" GOCACHE="$repo/target/go-build" \
        go build -o "$work/seed-go" seedclient
fi

# --- 3. the server ---------------------------------------------------------------
log "building the server ($profile)"
cargo build --quiet "${cargo_profile[@]}" --bin graviton
binary="$repo/target/$profile/graviton"

port_free() {
    "$py" -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}
if port_free 50051; then
    port=50051
else
    port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    log "port 50051 is taken; using $port (the seed's channel is rebound, see seed_client.py)"
fi

# Under target/: the file system the build uses, which supports O_DIRECT (tmpfs does not).
mkdir -p "$repo/target"
data_dir="$(mktemp -d "$repo/target/interop-data.XXXXXX")"
log "starting $binary on 127.0.0.1:$port, data in $data_dir"
RUST_LOG="${RUST_LOG:-info}" "$binary" serve --listen "127.0.0.1:$port" --data-dir "$data_dir" \
    --shards 2 --no-pin >"$work/server.log" 2>&1 &
server_pid=$!

ready=""
for _ in $(seq 1 300); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        break
    fi
    if ! port_free "$port" && "$py" -c 'import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()' "$port" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.2
done
if [[ -z "$ready" ]]; then
    log "the server did not start; its log:"
    cat "$work/server.log" >&2
    exit 1
fi

# --- 4. the seed client ----------------------------------------------------------
seed_args=(--stubs "$stubs" --target "localhost:$port")
if [[ -f "$seed_doc" ]]; then
    seed_args+=(--seed-doc "$seed_doc")
else
    log "no seed document at $seed_doc; not checking that the copy is verbatim"
fi
status=0
"$py" scripts/seed_client.py "${seed_args[@]}" || status=$?
if [[ "$go_client" == 1 ]]; then
    if [[ -f "$seed_doc" ]]; then
        "$py" scripts/seed-go/check.py verbatim --seed-doc "$seed_doc" \
            --source scripts/seed-go/seed_client.go || status=1
    fi
    mkdir -p "$work/go-blobs"
    "$work/seed-go" -target "localhost:$port" -out "$work/go-blobs" || status=1
    "$py" scripts/seed-go/check.py keys --dir "$work/go-blobs" || status=1
else
    log "GRAVITON_INTEROP_GO=0: the seed's Go client was NOT run"
fi

# --- 5. clean stop -----------------------------------------------------------------
kill -TERM "$server_pid"
server_status=0
wait "$server_pid" || server_status=$?
server_pid=""
if [[ $server_status -ne 0 ]]; then
    log "the server exited with status $server_status after SIGTERM; its log:"
    cat "$work/server.log" >&2
    exit 1
fi
if [[ $status -ne 0 ]]; then
    log "the seed client failed; the server's log:"
    cat "$work/server.log" >&2
    exit "$status"
fi
if [[ "$go_client" == 1 ]]; then
    log "passed: the seed's Python and Go clients round-trip through the server; clean shutdown"
else
    log "passed: the seed's Python client round-trips through the server; clean shutdown (Go skipped)"
fi
