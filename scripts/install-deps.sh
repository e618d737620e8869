#!/usr/bin/env bash
# Install the system tools that drctl's tests and scripts need, if missing.
#
#   scripts/install-deps.sh           age, zstd, tar, sqlite3, GNU time, PostgreSQL
#   scripts/install-deps.sh --bench   the above plus restic and pgBackRest (benchmark references)
#
# Debian/Ubuntu only (apt-get). Does nothing when every tool is already present,
# so it is cheap to call at the start of every script.
set -euo pipefail

usage() {
    echo "usage: $0 [--bench]" >&2
}

bench=0
for arg in "$@"; do
    case "$arg" in
        --bench) bench=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "install-deps: unknown argument: $arg" >&2
            usage
            exit 2
            ;;
    esac
done

# "<package> <path-or-command>" pairs: a package is needed when its probe is missing.
# GNU time is probed by path because `time` is also a shell keyword.
probes=(
    "age age"
    "age age-keygen"
    "zstd zstd"
    "tar tar"
    "sqlite3 sqlite3"
    "time /usr/bin/time"
    "postgresql-client psql"
    "postgresql-client pg_dump"
    "postgresql-client pg_basebackup"
    "postgresql pg_ctlcluster"
)
if [[ $bench -eq 1 ]]; then
    probes+=("restic restic" "pgbackrest pgbackrest")
fi

missing=()
for probe in "${probes[@]}"; do
    pkg=${probe%% *}
    cmd=${probe#* }
    if [[ $cmd == /* ]]; then
        [[ -x $cmd ]] && continue
    else
        command -v "$cmd" >/dev/null 2>&1 && continue
    fi
    # Add each package once.
    if [[ " ${missing[*]-} " != *" $pkg "* ]]; then
        missing+=("$pkg")
    fi
done

# The PostgreSQL tests need the server on 127.0.0.1:5432; start the installed cluster.
start_postgres() {
    if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432 &&
        command -v pg_lsclusters >/dev/null 2>&1; then
        pg_lsclusters -h | while read -r version cluster port _; do
            if [[ $port == 5432 ]]; then
                echo "install-deps: starting PostgreSQL cluster $version/$cluster"
                pg_ctlcluster "$version" "$cluster" start || true
            fi
        done
    fi
}

if [[ ${#missing[@]} -eq 0 ]]; then
    start_postgres
    echo "install-deps: all tools present"
    exit 0
fi

echo "install-deps: installing: ${missing[*]}"

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: apt-get not found; install these packages by hand: ${missing[*]}" >&2
    exit 1
fi

sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo_cmd=(sudo)
    else
        echo "install-deps: not root and sudo is not available; install: ${missing[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"

start_postgres

if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: note: cargo is not on PATH; install a Rust toolchain (https://rustup.rs)" >&2
fi
