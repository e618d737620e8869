#!/usr/bin/env bash
# Benchmark drctl against the stock pipeline it must be compatible with
# (tar | zstd -3 -T<cores> | age), on the same corpus, in the same run.
#
#   scripts/bench.sh
#
# Environment:
#   BENCH_DIR      working directory (default: bench-work, gitignored)
#   BENCH_RUNS     rounds; the best round counts (default: 3)
#   BENCH_RESTIC=1 also time restic on the same corpus, as a reference
#   BENCH_S3=1     also back up to and restore from S3 (moto, started by scripts/moto.sh):
#                  drctl with an s3:// repository against the stock pipeline piped
#                  through `aws s3 cp` (awscli, installed into a virtualenv)
#   BENCH_CORPUS_ONLY=1  only build the corpus (for other benchmark scripts) and exit
#
# The corpus (>= 1 GB: >= 700 MiB of real file trees copied from this machine
# with >= 30,000 files, plus 320 MiB of random data) is built once and reused.
# Results are printed as a Markdown table and written to $BENCH_DIR/results.md.
# Rounds keep their outputs until the end: allow about 3.5 GB of disk per round.
# Exits 1 if a restore does not reproduce the corpus.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
drctl=$root/target/release/drctl

runs=${BENCH_RUNS:-3}
if ! [[ $runs =~ ^[1-9][0-9]*$ ]]; then
    echo "bench: BENCH_RUNS must be a positive integer, got '$runs'" >&2
    exit 2
fi
bench_restic=${BENCH_RESTIC:-0}
bench_s3=${BENCH_S3:-0}
awscli_version=1.46.3

mkdir -p "${BENCH_DIR:-bench-work}"
work=$(cd "${BENCH_DIR:-bench-work}" && pwd)
corpus=$work/corpus
runs_dir=$work/run
logs=$work/logs
cores=$(nproc)

log() { printf '==> %s\n' "$*" >&2; }

# Removes a tree even when it contains read-only directories.
wipe() {
    local d
    for d in "$@"; do
        if [[ -e $d ]]; then
            chmod -R u+rwX "$d" 2>/dev/null || true
            rm -rf "$d"
        fi
    done
}

# Meaning of drctl's documented exit codes, for error messages.
exit_meaning() {
    case $1 in
        0) echo "ok" ;;
        1) echo "failure" ;;
        2) echo "usage or invalid input" ;;
        3) echo "partial" ;;
        4) echo "integrity error" ;;
        10) echo "not found or not initialised" ;;
        11) echo "locked" ;;
        12) echo "wrong key" ;;
        130) echo "cancelled" ;;
        *) echo "unexpected" ;;
    esac
}

fail_with_log() { # <what> <rc> <logfile>
    echo "bench: $1 failed with exit code $2 ($(exit_meaning "$2")); last lines of $3:" >&2
    tail -n 20 "$3" >&2 || true
    exit 1
}

# Sum of regular file sizes and number of regular files under a directory.
tree_bytes() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
tree_files() { find "$1" -type f | wc -l; }

# Last line of a GNU time output file (earlier lines may report a non-zero exit).
time_field() { # <file> <field number>
    tail -n 1 "$1" | awk -v f="$2" '{ print $f }'
}

# ---------------------------------------------------------------------------
log "installing tools"
bash scripts/install-deps.sh --bench

corpus_only=${BENCH_CORPUS_ONLY:-0}
if [[ $corpus_only != 1 ]]; then
    log "building drctl (release)"
    cargo build --release --locked
fi

mkdir -p "$logs"

# ---------------------------------------------------------------------------
# Corpus
min_tree_bytes=$((700 * 1024 * 1024))
min_tree_files=30000
random_files=4
random_mib=80

build_corpus() {
    local started=$SECONDS
    log "building corpus in $corpus"
    wipe "$corpus" "$work/corpus.done"
    mkdir -p "$corpus/tree" "$corpus/random"

    # Real trees: text (docs, headers, sources) and binary (shared objects,
    # compiled Python, images, compressed man pages).
    local sources=() src
    for src in /usr/share /usr/include /usr/lib/python3* /usr/lib/gcc /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu; do
        [[ -d $src && -r $src ]] && sources+=("$src")
    done
    if [[ ${#sources[@]} -eq 0 ]]; then
        echo "bench: no source trees found under /usr to build the corpus from" >&2
        exit 1
    fi

    local rep=0 bytes=0 files=0 dest
    while :; do
        for src in "${sources[@]}"; do
            dest=$corpus/tree/$(printf '%02d' "$rep")${src}
            mkdir -p "$(dirname "$dest")"
            if ! cp -a "$src" "$dest" 2>>"$logs/corpus-copy.err"; then
                log "warning: some files under $src could not be copied (see $logs/corpus-copy.err)"
            fi
            bytes=$(tree_bytes "$corpus/tree")
            files=$(tree_files "$corpus/tree")
            if ((bytes >= min_tree_bytes && files >= min_tree_files)); then
                break 2
            fi
        done
        rep=$((rep + 1))
        if ((rep >= 100)); then
            echo "bench: could not reach the corpus size after 100 copies of ${sources[*]}" >&2
            exit 1
        fi
    done
    # Keep only regular files, directories and symlinks: sockets, FIFOs and
    # device nodes are not what this benchmark measures.
    find "$corpus" ! -type f ! -type d ! -type l -delete

    # Incompressible part.
    local i
    for ((i = 1; i <= random_files; i++)); do
        head -c "${random_mib}M" /dev/urandom >"$corpus/random/blob-$i.bin"
    done

    bytes=$(tree_bytes "$corpus")
    files=$(tree_files "$corpus")
    echo "$bytes $files" >"$work/corpus.done"
    log "corpus: $bytes bytes, $files files, built in $((SECONDS - started)) s"
}

if [[ -d $corpus && -s $work/corpus.done ]]; then
    log "reusing corpus in $corpus"
else
    build_corpus
fi
read -r corpus_bytes corpus_files <"$work/corpus.done"
corpus_links=$(find "$corpus" -type l | wc -l)
corpus_mb=$(awk -v b="$corpus_bytes" 'BEGIN { printf "%.0f", b / 1e6 }')
if [[ $corpus_only == 1 ]]; then
    log "corpus ready: $corpus ($corpus_mb MB, $corpus_files files)"
    exit 0
fi

# ---------------------------------------------------------------------------
# Key and drctl configuration
if [[ ! -s $work/key.txt ]]; then
    log "generating age key"
    (umask 077 && age-keygen -o "$work/key.txt" 2>/dev/null)
fi
pub=$(age-keygen -y "$work/key.txt")

mkdir -p "$work/policies"
cat >"$work/policies/bench.yaml" <<YAML
name: bench
description: Benchmark corpus
source:
  kind: files
  paths: ["$corpus"]
schedule:
  full: "0 0 3 * * *"
retention:
  keep-last: 1
compression:
  level: 3
  threads: 0
YAML

# S3 (moto) and the AWS CLI for the S3 rounds.
if [[ $bench_s3 == 1 ]]; then
    bash scripts/moto.sh
    s3_endpoint=http://127.0.0.1:${DRCTL_MOTO_PORT:-5000}
    export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1
    export AWS_EC2_METADATA_DISABLED=true
    awscli_home=${XDG_CACHE_HOME:-$HOME/.cache}/drctl/awscli-$awscli_version
    if [[ ! -x $awscli_home/bin/aws ]]; then
        log "installing awscli $awscli_version into $awscli_home"
        python3 -m venv "$awscli_home"
        "$awscli_home/bin/pip" install --quiet --disable-pip-version-check "awscli==$awscli_version"
    fi
    aws() { "$awscli_home/bin/aws" --endpoint-url "$s3_endpoint" "$@"; }
fi

# A fresh drctl repository and registry for one round (same key every round), in a local
# directory (drctl) or in a new S3 bucket (drctl-s3).
init_drctl_repo() { # [drctl|drctl-s3]
    local name=${1:-drctl} repository=file://repo
    local dir=$run/$name
    if [[ $name == drctl-s3 ]]; then
        repository="s3://$(s3_bucket)/drctl?region=us-east-1&endpoint=$s3_endpoint"
    fi
    mkdir -p "$dir"
    cat >"$dir/drctl.yaml" <<YAML
environment: bench
repository: $repository
registry: sqlite://registry.db
recipients: ["$pub"]
identity-file: $work/key.txt
policies-dir: $work/policies
YAML
    local rc=0
    DRCTL_CONFIG=$dir/drctl.yaml "$drctl" init >"$logs/drctl-init.log" 2>&1 || rc=$?
    ((rc == 0)) || fail_with_log "drctl init" "$rc" "$logs/drctl-init.log"
}

# The bucket of this round's S3 runs.
s3_bucket() { echo "drctl-bench-round-$r"; }

# ---------------------------------------------------------------------------
# Timed operations. Each writes "<elapsed seconds> <peak RSS KiB>" to $1.
# Stock pipelines: elapsed is the whole pipeline; peak RSS is the largest of
# its processes (the per-stage values are kept in $1.stages).

# shellcheck disable=SC2016 # expanded by the inner bash
stock_pipeline_script='
set -euo pipefail
t=$1; mode=$2; threads=$3; corpus=$4; pub=$5; key=$6; archive=$7; out=$8
if [[ $mode == backup && -n ${S3_URL:-} ]]; then
    /usr/bin/time -f "%M" -o "$t.tar" tar -C "$corpus" -cf - . |
        /usr/bin/time -f "%M" -o "$t.zstd" zstd -3 -T"$threads" -q |
        /usr/bin/time -f "%M" -o "$t.age" age -r "$pub" |
        /usr/bin/time -f "%M" -o "$t.aws" "$AWS" --endpoint-url "$S3_ENDPOINT" s3 cp - "$S3_URL"
elif [[ $mode == backup ]]; then
    /usr/bin/time -f "%M" -o "$t.tar" tar -C "$corpus" -cf - . |
        /usr/bin/time -f "%M" -o "$t.zstd" zstd -3 -T"$threads" -q |
        /usr/bin/time -f "%M" -o "$t.age" age -r "$pub" >"$archive"
elif [[ -n ${S3_URL:-} ]]; then
    /usr/bin/time -f "%M" -o "$t.aws" "$AWS" --endpoint-url "$S3_ENDPOINT" s3 cp "$S3_URL" - |
        /usr/bin/time -f "%M" -o "$t.age" age -d -i "$key" |
        /usr/bin/time -f "%M" -o "$t.zstd" zstd -d -q |
        /usr/bin/time -f "%M" -o "$t.tar" tar -x -C "$out"
else
    /usr/bin/time -f "%M" -o "$t.age" age -d -i "$key" "$archive" |
        /usr/bin/time -f "%M" -o "$t.zstd" zstd -d -q |
        /usr/bin/time -f "%M" -o "$t.tar" tar -x -C "$out"
fi
'

timed_stock() { # <timing file> backup|restore [s3]
    local t=$1 mode=$2 rc=0 stage rss=0 v name=stock stages=(tar zstd age) s3=()
    if [[ ${3:-} == s3 ]]; then
        name=stock-s3 stages+=(aws)
        s3=(env AWS="$awscli_home/bin/aws" S3_ENDPOINT="$s3_endpoint"
            S3_URL="s3://$(s3_bucket)/stock/stock.tar.zst.age")
    fi
    sync
    "${s3[@]}" /usr/bin/time -f '%e %M' -o "$t.total" \
        bash -c "$stock_pipeline_script" bash "$t" "$mode" "$cores" "$corpus" "$pub" \
        "$work/key.txt" "$run/stock.tar.zst.age" "$run/out-$name" \
        >"$logs/$name-$mode.log" 2>&1 || rc=$?
    ((rc == 0)) || fail_with_log "$name $mode" "$rc" "$logs/$name-$mode.log"
    : >"$t.stages"
    for stage in "${stages[@]}"; do
        v=$(time_field "$t.$stage" 1)
        echo "$stage $v" >>"$t.stages"
        ((v > rss)) && rss=$v
    done
    echo "$(time_field "$t.total" 1) $rss" >"$t"
}

timed_drctl() { # <timing file> backup|restore [s3]
    local t=$1 mode=$2 rc=0 args name=drctl
    [[ ${3:-} == s3 ]] && name=drctl-s3
    if [[ $mode == backup ]]; then
        args=(backup --policy bench)
    else
        args=(restore --backup latest --policy bench --target "$run/out-$name")
    fi
    sync
    DRCTL_CONFIG=$run/$name/drctl.yaml /usr/bin/time -f '%e %M' -o "$t.total" \
        "$drctl" "${args[@]}" >"$logs/$name-$mode.log" 2>&1 || rc=$?
    ((rc == 0)) || fail_with_log "drctl ${args[*]}" "$rc" "$logs/drctl-$mode.log"
    echo "$(time_field "$t.total" 1) $(time_field "$t.total" 2)" >"$t"
}

timed_restic() { # <timing file> backup|restore
    local t=$1 mode=$2 rc=0 args
    if [[ $mode == backup ]]; then
        args=(backup --quiet "$corpus")
    else
        args=(restore latest --quiet --target "$run/out-restic")
    fi
    sync
    RESTIC_REPOSITORY=$run/restic RESTIC_PASSWORD=bench /usr/bin/time -f '%e %M' -o "$t.total" \
        restic "${args[@]}" >"$logs/restic-$mode.log" 2>&1 || rc=$?
    ((rc == 0)) || fail_with_log "restic ${args[*]}" "$rc" "$logs/restic-$mode.log"
    echo "$(time_field "$t.total" 1) $(time_field "$t.total" 2)" >"$t"
}

# ---------------------------------------------------------------------------
# Verification: file contents (diff -r, symlinks compared as links) and a
# listing of type, mode, size, mtime (whole seconds) and symlink target.
listing() {
    (cd "$1" && find . -mindepth 1 \
        \( -type d -printf 'd %m %P\n' \) -o \
        \( -type l -printf 'l %P -> %l\n' \) -o \
        \( -type f -printf 'f %m %s %T@ %P\n' \)) |
        sed -E 's/^(f [0-7]+ [0-9]+ [0-9]+)\.[0-9]+ /\1 /' | LC_ALL=C sort
}

corpus_listing=""
verify_failed=0
verify_notes=()

verify_restore() { # <name> <restored tree>
    local name=$1 dir=$2
    if [[ -z $corpus_listing ]]; then
        corpus_listing=$work/corpus.listing
        listing "$corpus" >"$corpus_listing"
    fi
    log "verifying $name restore ($dir)"
    if ! diff -r --no-dereference "$corpus" "$dir" >"$logs/verify-$name.diff" 2>&1; then
        verify_failed=1
        verify_notes+=("$name: contents differ from the corpus (see $logs/verify-$name.diff)")
        head -n 20 "$logs/verify-$name.diff" >&2
        return
    fi
    if ! listing "$dir" | diff "$corpus_listing" - >"$logs/verify-$name.listing.diff"; then
        verify_failed=1
        verify_notes+=("$name: contents match but metadata (type, mode, size, mtime or link target) differs (see $logs/verify-$name.listing.diff)")
        head -n 20 "$logs/verify-$name.listing.diff" >&2
        return
    fi
    verify_notes+=("$name: identical to the corpus (contents, modes, mtimes, symlinks)")
}

# drctl restores a tree under its absolute path inside the target.
drctl_restored_tree() { # <output directory>
    local c
    for c in "$1/${corpus#/}" "$1/corpus" "$1"; do
        if [[ -d $c/random ]]; then
            echo "$c"
            return
        fi
    done
    echo "$1/${corpus#/}"
}

timed_stock-s3() { timed_stock "$@" s3; }
timed_drctl-s3() { timed_drctl "$@" s3; }

# ---------------------------------------------------------------------------
wipe "$runs_dir" # left over by an interrupted run
log "warming the page cache"
tar -C "$work" -cf - corpus | cat >/dev/null # piped: GNU tar skips reading files when writing to /dev/null

results=$work/rounds
wipe "$results"
mkdir -p "$results"

tools=(stock drctl)
[[ $bench_restic == 1 ]] && tools+=(restic)
[[ $bench_s3 == 1 ]] && tools+=(stock-s3 drctl-s3)

for ((r = 1; r <= runs; r++)); do
    log "round $r of $runs"
    # Each round works in a directory of its own, removed only at the end: ext4 scans
    # past inodes freed in the last minutes when it creates files, so deleting one
    # round's tens of thousands of files would slow the next round's restores by an
    # amount that depends on timing, not on the tool.
    run=$runs_dir/round-$r
    mkdir -p "$run"
    init_drctl_repo
    if [[ $bench_s3 == 1 ]]; then
        aws s3 mb "s3://$(s3_bucket)" >"$logs/s3-mb.log" 2>&1 || fail_with_log "aws s3 mb" $? "$logs/s3-mb.log"
        init_drctl_repo drctl-s3
    fi
    if [[ $bench_restic == 1 ]]; then
        RESTIC_REPOSITORY=$run/restic RESTIC_PASSWORD=bench restic init >"$logs/restic-init.log" 2>&1 ||
            fail_with_log "restic init" $? "$logs/restic-init.log"
    fi

    # Alternate who goes first so neither side always runs on a warmer machine.
    if ((r % 2 == 1)); then
        order=("${tools[@]}")
    else
        order=(drctl stock)
        [[ $bench_restic == 1 ]] && order+=(restic)
        [[ $bench_s3 == 1 ]] && order+=(drctl-s3 stock-s3)
    fi

    for tool in "${order[@]}"; do
        log "  $tool backup"
        "timed_$tool" "$results/$tool-backup-$r" backup
    done

    stored_stock=$(stat -c %s "$run/stock.tar.zst.age")
    stored_drctl=$(tree_bytes "$run/drctl/repo")
    [[ $bench_restic == 1 ]] && stored_restic=$(tree_bytes "$run/restic")

    for tool in "${order[@]}"; do
        mkdir -p "$run/out-$tool"
        log "  $tool restore"
        "timed_$tool" "$results/$tool-restore-$r" restore
    done

    if ((r == 1)); then
        verify_restore stock "$run/out-stock"
        verify_restore drctl "$(drctl_restored_tree "$run/out-drctl")"
        if [[ $bench_s3 == 1 ]]; then
            verify_restore stock-s3 "$run/out-stock-s3"
            verify_restore drctl-s3 "$(drctl_restored_tree "$run/out-drctl-s3")"
        fi
        if [[ $bench_restic == 1 ]]; then
            verify_restore restic "$run/out-restic/${corpus#/}"
        fi
    fi
done
wipe "$runs_dir"

# ---------------------------------------------------------------------------
# Report: best (shortest) elapsed time per tool and operation; peak RSS is the
# largest seen in any round.
round_results() { # <tool> <operation>: one "<seconds> <KiB>" line per round
    local i
    for ((i = 1; i <= runs; i++)); do cat "$results/$1-$2-$i"; done
}
best_secs() { round_results "$1" "$2" | awk 'NR == 1 || $1 < m { m = $1 } END { print m }'; }
peak_kib() { round_results "$1" "$2" | awk '$2 > m { m = $2 } END { print m + 0 }'; }
mbps() { awk -v b="$corpus_bytes" -v s="$1" 'BEGIN { if (s <= 0) s = 0.01; printf "%.1f", b / s / 1e6 }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
# Throughput ratio drctl / stock, from elapsed seconds (stock, drctl).
ratio() { awk -v s="$1" -v d="$2" 'BEGIN { if (d <= 0) d = 0.01; printf "%.2f", s / d }'; }
size_line() { awk -v n="$1" -v s="$2" -v c="$corpus_bytes" 'BEGIN { printf "| %s | %.1f | %.1f%% |\n", n, s / 1e6, 100 * s / c }'; }

drctl_version=$("$drctl" --version 2>/dev/null || echo "drctl (version unknown)")
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)

{
    echo "## drctl benchmark"
    echo
    echo "- Date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host: ${cpu:-unknown CPU}, $cores cores, $(uname -sr)"
    echo "- Tools: $drctl_version; $(tar --version | head -n 1); zstd $(zstd --version | grep -o "v[0-9][0-9.]*" | head -n 1); age $(age --version)"
    echo "- Corpus: $corpus_mb MB in $corpus_files files (+ $corpus_links symlinks): system file trees plus $((random_files * random_mib)) MiB of random data"
    echo "- Stock pipeline: \`tar -cf - . | zstd -3 -T$cores | age -r KEY\` and \`age -d | zstd -d | tar -x\`; drctl: zstd level 3, threads 0"
    echo "- Best of $runs rounds (page cache warm); throughput = corpus bytes / elapsed seconds; ratio = drctl / stock (above 1 means drctl is faster)"
    echo "- Peak RSS: drctl is one process; for the stock pipeline it is the largest of its three processes (highest over all rounds)"
    if [[ $bench_s3 == 1 ]]; then
        echo "- S3 rows: moto $(grep -o '^moto_version=.*' scripts/moto.sh | cut -d= -f2) on 127.0.0.1 (one Python process, which bounds both sides); stock = the same pipeline through \`aws s3 cp\` (awscli $awscli_version), whose RSS counts as a fourth stage"
    fi
    echo "- Restores write to $(df -P "$work" | awk 'NR == 2 { print $1 }'); write-back makes them vary between rounds on virtual disks (raise BENCH_RUNS)"
    echo
    echo "| operation | stock MB/s | drctl MB/s | ratio | stock peak RSS MiB | drctl peak RSS MiB |"
    echo "|---|---:|---:|---:|---:|---:|"
    pairs=("stock drctl")
    [[ $bench_s3 == 1 ]] && pairs+=("stock-s3 drctl-s3")
    for pair in "${pairs[@]}"; do
        read -r st dt <<<"$pair"
        where=""
        [[ $st == stock-s3 ]] && where=" (S3)"
        for op in backup restore; do
            s=$(best_secs "$st" "$op")
            d=$(best_secs "$dt" "$op")
            echo "| $op$where | $(mbps "$s") | $(mbps "$d") | $(ratio "$s" "$d") | $(mib "$(peak_kib "$st" "$op")") | $(mib "$(peak_kib "$dt" "$op")") |"
        done
    done
    echo
    echo "Stored size (last round):"
    echo
    echo "| | MB | of corpus |"
    echo "|---|---:|---:|"
    size_line "stock (.tar.zst.age)" "$stored_stock"
    size_line "drctl (repository)" "$stored_drctl"
    if [[ $bench_restic == 1 ]]; then
        size_line "restic (repository)" "$stored_restic"
    fi
    if [[ $bench_restic == 1 ]]; then
        echo
        echo "Reference, restic $(restic version | awk '{ print $2 }') (default compression):"
        echo
        echo "| operation | restic MB/s | restic peak RSS MiB |"
        echo "|---|---:|---:|"
        for op in backup restore; do
            echo "| $op | $(mbps "$(best_secs restic "$op")") | $(mib "$(peak_kib restic "$op")") |"
        done
    fi
    echo
    echo "Per round (elapsed s / peak RSS MiB):"
    echo
    echo "| round | tool | backup | restore |"
    echo "|---:|---|---:|---:|"
    for ((r = 1; r <= runs; r++)); do
        for tool in "${tools[@]}"; do
            read -r bs bk <"$results/$tool-backup-$r"
            read -r rs rk <"$results/$tool-restore-$r"
            echo "| $r | $tool | $bs / $(mib "$bk") | $rs / $(mib "$rk") |"
        done
    done
    echo
    echo "Verification (round 1):"
    echo
    for note in "${verify_notes[@]}"; do
        echo "- $note"
    done
} | tee "$work/results.md"

echo
log "results written to $work/results.md"
if ((verify_failed)); then
    echo "bench: a restore did not reproduce the corpus" >&2
    exit 1
fi
