#!/usr/bin/env bash
# Benchmark drctl's PostgreSQL backups against the tools they replace, on the same cluster in
# the same run:
#   physical full   drctl backup (the data directory's files | zstd -3 | age)  vs  pgBackRest
#                   full backup (zstd level 3, process-max = cores, AES-256 repository
#                   encryption); both read the files between pg_backup_start/stop; each
#                   ends once the WAL its backup needs is in its own archive (the server's
#                   archive_command is `pgbackrest archive-push` during pgBackRest's runs)
#   logical dump    drctl backup (pg_dump -Fc -Z0 | zstd -3 | age, plus row counts)  vs
#                   pg_dump -Fc to a file
#   logical restore drctl restore --to-database  vs  pg_restore -j <cores> from that file,
#                   each into an empty database created before the timed run
#
#   scripts/bench-pg.sh
#
# Environment:
#   BENCH_DIR        working directory (default: bench-work/pg)
#   BENCH_PG_SCALE   pgbench scale factor (default 50, about 750 MB)
#   BENCH_PG_EVENTS  rows of the text-heavy `events` table (default 2500000, about 450 MB)
#   BENCH_PG_PORT    port of the scratch cluster (default 55499)
#   BENCH_RUNS       rounds (default 2); the best round of each operation counts. The
#                    reference and drctl swap order every round, and each timed run starts
#                    after a checkpoint with the WAL archive caught up.
#   DRCTL_BIN        drctl binary to measure (default: build target/release/drctl)
#   BENCH_PG_SMALL=1 allow a database under 1 GB (a quick check of the script itself)
#
# A scratch cluster (initdb -k, with data checksums; run as the `postgres` OS user when
# started as root) is created once in $BENCH_DIR/data and reused; its database `bench` holds
# pgbench tables plus a table of realistic text. Times, peak RSS and the tool's CPU time (its
# own and its child processes', not the server's) come from GNU time (-v); "cores busy" is
# how busy the machine's cores were during the run (/proc/stat): near 100% means the run
# was bound by CPU, most of it the server's, shared by drctl and the reference alike.
# Results are printed as a Markdown table and written to $BENCH_DIR/results.md. Exits 1 if a
# restore's row counts differ from the source.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
cores=$(nproc)
scale=${BENCH_PG_SCALE:-50}
events=${BENCH_PG_EVENTS:-2500000}
port=${BENCH_PG_PORT:-55499}
runs=${BENCH_RUNS:-2}

mkdir -p "${BENCH_DIR:-bench-work/pg}"
work=$(cd "${BENCH_DIR:-bench-work/pg}" && pwd)
logs=$work/logs
data=$work/data
home=$work/drctl
url="postgres://postgres@127.0.0.1:$port"

log() { printf '==> %s\n' "$*" >&2; }

# The server refuses root: as root, run server-side commands as `postgres`.
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pgbin() { # <program>: Debian's newest versioned directory, then pg_config, then PATH
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) "$(pg_config --bindir 2>/dev/null)"; do
        if [[ -x $d/$1 ]]; then
            echo "$d/$1"
            return
        fi
    done
    command -v "$1" || {
        echo "bench-pg: $1 not found; run scripts/install-deps.sh" >&2
        exit 1
    }
}

sql() { psql -X -A -t -q -v ON_ERROR_STOP=1 -d "$url/${2:-bench}" -c "$1"; }

# Runs a command (as the server's OS user) under GNU time -v; keeps its output in
# $logs/<name>.log.
cpu_jiffies() { # busy and all jiffies of the machine so far (the first line of /proc/stat)
    awk '/^cpu / { all = 0; for (i = 2; i <= NF; i++) all += $i; print all - $5 - $6, all }' /proc/stat
}
timed() { # <name> <command...>: also writes how busy the machine's cores were to <name>.busy
    local name=$1 before after
    shift
    before=$(cpu_jiffies)
    if ! as_pg /usr/bin/time -v -o "$logs/$name.time" "$@" >"$logs/$name.log" 2>&1; then
        echo "bench-pg: $name failed; last lines of $logs/$name.log:" >&2
        tail -n 20 "$logs/$name.log" >&2
        exit 1
    fi
    after=$(cpu_jiffies)
    awk -v b="$before" -v a="$after" 'BEGIN { split(b, x, " "); split(a, y, " ");
        printf "%.0f\n", 100 * (y[1] - x[1]) / (y[2] - x[2]) }' >"$logs/$name.busy"
}
seconds() { # wall clock of a GNU time -v file, in seconds
    awk -F': ' '/Elapsed \(wall clock\)/ {
        n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s }' "$logs/$1.time"
}
cpu_seconds() { # user + system time of the tool and the processes it waited for
    awk -F': ' '/(User|System) time/ { s += $2 } END { printf "%.1f", s }' "$logs/$1.time"
}
rss_mib() {
    awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$logs/$1.time"
}

# ---------------------------------------------------------------------------
log "installing tools"
bash scripts/install-deps.sh --bench
drctl_src=${DRCTL_BIN:-}
if [[ -z $drctl_src ]]; then
    log "building drctl (release)"
    cargo build --release --locked
    drctl_src=$root/target/release/drctl
fi
mkdir -p "$logs"
# A private copy: the archive_command must not change under the running server.
cp "$drctl_src" "$work/drctl-bin.new" && mv "$work/drctl-bin.new" "$work/drctl-bin"
drctl=$work/drctl-bin
if [[ $(id -u) -eq 0 ]]; then
    chown postgres:postgres "$work"
    chown -R postgres:postgres "$logs"
fi

# ---------------------------------------------------------------------------
# The scratch cluster and its data (built once).
if [[ ! -f $data/PG_VERSION ]]; then
    log "creating the scratch cluster in $data"
    # With data checksums, as production clusters have them: both tools check every page.
    as_pg "$(pgbin initdb)" -D "$data" -U postgres -A trust --no-sync -k >"$logs/initdb.log"
    cat >>"$data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '/tmp'
shared_buffers = 256MB
max_wal_size = 4GB
archive_mode = on
archive_command = '/bin/true'
CONF
    echo "host replication postgres 127.0.0.1/32 trust" >>"$data/pg_hba.conf"
fi
if ! as_pg "$(pgbin pg_ctl)" -D "$data" status >/dev/null 2>&1; then
    as_pg "$(pgbin pg_ctl)" -D "$data" -l "$data/server.log" -w start >/dev/null
fi
if [[ ! -f $work/loaded ]]; then
    log "loading data: pgbench scale $scale and $events rows of text"
    # Loading does not need archiving; the benchmark switches it to drctl below.
    sql "ALTER SYSTEM SET archive_command = '/bin/true'" postgres
    sql "SELECT pg_reload_conf()" postgres >/dev/null
    sql "DROP DATABASE IF EXISTS bench" postgres
    sql "CREATE DATABASE bench" postgres
    pgbench -i -q -s "$scale" -d "$url/bench" >"$logs/pgbench.log" 2>&1
    sql "CREATE TABLE events (
            id bigint PRIMARY KEY,
            at timestamptz NOT NULL,
            account int NOT NULL,
            kind text NOT NULL,
            message text NOT NULL,
            payload jsonb)"
    sql "INSERT INTO events
         SELECT g,
                timestamptz '2026-01-01' + g * interval '7 seconds',
                ((g * 7919) % ($scale * 100000) + 1)::int,
                (ARRAY['login','logout','transfer','deposit','withdrawal','audit'])[(1 + g % 6)::int],
                'user ' || (g % 50000) || ' ' ||
                  (ARRAY['moved funds to','checked balance of','updated address for','closed'])[(1 + g % 4)::int] ||
                  ' account ' || ((g * 31) % 1000000) || ' ref ' || md5(g::text) ||
                  CASE WHEN g % 3 = 0 THEN ' note: ' || repeat(substr(md5((g * 17)::text), 1, 12) || ' ', (1 + g % 5)::int) ELSE '' END,
                jsonb_build_object('ip', '10.' || (g % 250) || '.' || (g % 97) || '.' || (g % 13),
                                   'amount', round((g % 100000) / 100.0, 2),
                                   'agent', (ARRAY['web','ios','android','api'])[(1 + g % 4)::int])
         FROM generate_series(1::bigint, $events) g"
    sql "CREATE INDEX events_account ON events (account, at)"
    sql "VACUUM ANALYZE"
    touch "$work/loaded"
fi
db_bytes=$(sql "SELECT pg_database_size('bench')")
cluster_bytes=$(sql "SELECT sum(pg_database_size(datname)) FROM pg_database")
log "database bench: $((db_bytes / 1048576)) MiB; cluster: $((cluster_bytes / 1048576)) MiB"
if ((db_bytes < 1000000000)) && [[ ${BENCH_PG_SMALL:-0} != 1 ]]; then
    echo "bench-pg: the database is under 1 GB; raise BENCH_PG_SCALE" >&2
    exit 1
fi

# ---------------------------------------------------------------------------
# drctl home, fresh each run; WAL now goes to drctl.
log "setting up drctl and pgBackRest"
as_pg rm -rf "$home" "$work/pgbackrest"
as_pg mkdir -p "$home/policies" "$work/pgbackrest"
as_pg tee "$home/drctl.yaml" >/dev/null <<YAML
environment: bench
repository: file://repo
registry: sqlite://registry.db
recipients-file: keys/recipients.txt
identity-file: keys/identity.txt
YAML
as_pg tee "$home/policies/physical.yaml" >/dev/null <<YAML
name: physical
source:
  kind: postgres
  mode: physical
  url: $url/postgres
  data-directory: $data
YAML
as_pg tee "$home/policies/logical.yaml" >/dev/null <<YAML
name: logical
source:
  kind: postgres
  mode: logical
  url: $url/bench
YAML
as_pg env DRCTL_CONFIG="$home/drctl.yaml" "$drctl" init >"$logs/drctl-init.log"
# The server archives into drctl, except during pgBackRest's backups, which (like drctl's)
# end only once the WAL they need is in their own archive.
drctl_archive="$drctl -q --config $home/drctl.yaml wal push --policy physical %p"
pgbackrest_archive="pgbackrest --config=$work/pgbackrest.conf --stanza=bench archive-push %p"
archive_to() { # <archive_command>
    sql "ALTER SYSTEM SET archive_command = '$1'" postgres
    sql "SELECT pg_reload_conf()" postgres >/dev/null
}
archive_to "$drctl_archive"

as_pg tee "$work/pgbackrest.conf" >/dev/null <<CONF
[global]
repo1-path=$work/pgbackrest/repo
repo1-retention-full=1
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=bench-only-passphrase
compress-type=zst
compress-level=3
process-max=$cores
start-fast=y
log-path=$work/pgbackrest
lock-path=$work/pgbackrest
log-level-console=warn
log-level-file=off

[bench]
pg1-path=$data
pg1-port=$port
pg1-socket-path=/tmp
pg1-user=postgres
CONF
pgbackrest=(pgbackrest --config="$work/pgbackrest.conf" --stanza=bench)
as_pg "${pgbackrest[@]}" stanza-create >"$logs/pgbackrest-stanza.log" 2>&1
sql "CHECKPOINT" postgres

# ---------------------------------------------------------------------------
# Before each timed run: a checkpoint, and every finished WAL segment archived (the
# archive_command is drctl's, so a backlog left by the previous run would load this one).
settle() {
    sql "CHECKPOINT" postgres
    local i
    for ((i = 0; i < 600; i++)); do
        [[ $(sql "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'" postgres) == 0 ]] && break
        sleep 0.5
    done
    sync
}

# Checks a restored database's row counts, then drops it (before autovacuum, which would
# otherwise process the new tables during the next timed run).
check_and_drop() { # <database>
    local got
    got=$(counts "$1")
    if [[ $got != "$want" ]]; then
        echo "bench-pg: $1 has $got rows (accounts/events), bench has $want" >&2
        exit 1
    fi
    sql "DROP DATABASE $1 WITH (FORCE)" postgres
}

# One timed operation of a round; the reference tools and drctl swap order every round.
run_op() { # <op> <round>
    local r=$2
    case $1 in
        drctl-physical)
            timed "drctl-physical-$r" env DRCTL_CONFIG="$home/drctl.yaml" "$drctl" --json backup -q --policy physical ;;
        pgbackrest-full)
            archive_to "$pgbackrest_archive"
            timed "pgbackrest-full-$r" "${pgbackrest[@]}" --type=full backup
            settle
            archive_to "$drctl_archive" ;;
        pg-dump)
            rm -f "$work/bench.pgdump"
            timed "pg-dump-$r" pg_dump -Fc -f "$work/bench.pgdump" -d "$url/bench" ;;
        drctl-logical)
            timed "drctl-logical-$r" env DRCTL_CONFIG="$home/drctl.yaml" "$drctl" --json backup -q --policy logical ;;
        pg-restore)
            sql "CREATE DATABASE restore_pgrestore" postgres
            settle
            timed "pg-restore-$r" pg_restore -j "$cores" -d "$url/restore_pgrestore" "$work/bench.pgdump"
            check_and_drop restore_pgrestore ;;
        drctl-restore)
            sql "CREATE DATABASE restore_drctl" postgres
            settle
            timed "drctl-restore-$r" env DRCTL_CONFIG="$home/drctl.yaml" "$drctl" restore -q --policy logical \
                --backup latest --to-database "$url/restore_drctl"
            check_and_drop restore_drctl ;;
    esac
}

counts() { sql "SELECT (SELECT count(*) FROM pgbench_accounts) || '/' || (SELECT count(*) FROM events)" "$1"; }
want=$(counts bench)
for db in restore_pgrestore restore_drctl; do
    sql "DROP DATABASE IF EXISTS $db WITH (FORCE)" postgres
done
for ((r = 1; r <= runs; r++)); do
    for pair in "drctl-physical pgbackrest-full" "pg-dump drctl-logical" "pg-restore drctl-restore"; do
        read -r first second <<<"$pair"
        ((r % 2 == 0)) && read -r second first <<<"$pair"
        for op in "$first" "$second"; do
            log "round $r of $runs: $op"
            settle
            run_op "$op" "$r"
        done
    done
done

# The best round of each operation counts.
for op in drctl-physical pgbackrest-full pg-dump drctl-logical pg-restore drctl-restore; do
    best=1
    for ((r = 2; r <= runs; r++)); do
        if awk -v a="$(seconds "$op-$r")" -v b="$(seconds "$op-$best")" 'BEGIN { exit !(a < b) }'; then
            best=$r
        fi
    done
    for f in log time busy; do cp "$logs/$op-$best.$f" "$logs/$op.$f"; done
done

# ---------------------------------------------------------------------------
stored_size() { grep -o '"stored_size":[0-9]*' "$logs/$1.log" | head -1 | cut -d: -f2; }
drctl_physical_stored=$(stored_size drctl-physical)
drctl_logical_stored=$(stored_size drctl-logical)
pgbackrest_stored=$(du -sb "$work/pgbackrest/repo/backup" | awk '{ print $1 }')
dump_stored=$(stat -c %s "$work/bench.pgdump")

row() { # <label> <run> <bytes processed> <stored bytes or -> <reference run or ->
    local s mibs ratio stored
    s=$(seconds "$2")
    mibs=$(awk -v b="$3" -v s="$s" 'BEGIN { printf "%.1f", b / 1048576 / (s > 0 ? s : 0.01) }')
    ratio=-
    if [[ $5 != - ]]; then
        ratio=$(awk -v a="$(seconds "$5")" -v b="$s" 'BEGIN { printf "%.2fx", a / (b > 0 ? b : 0.01) }')
    fi
    stored=-
    [[ $4 != - ]] && stored=$(awk -v b="$4" 'BEGIN { printf "%.0f MiB", b / 1048576 }')
    printf '| %s | %.1f | %s | %s | %s%% | %s | %s | %s |\n' "$1" "$s" "$mibs" "$(cpu_seconds "$2")" \
        "$(cat "$logs/$2.busy")" "$(rss_mib "$2")" "$stored" "$ratio"
}

{
    echo "PostgreSQL $(sql 'SHOW server_version' postgres), $cores cores; database bench $((db_bytes / 1048576)) MiB, cluster $((cluster_bytes / 1048576)) MiB"
    echo
    echo "| run | seconds | MiB/s (of the database) | tool CPU s | cores busy | peak RSS MiB | stored | throughput vs reference |"
    echo "|---|---|---|---|---|---|---|---|"
    row "drctl physical full" drctl-physical "$cluster_bytes" "$drctl_physical_stored" pgbackrest-full
    row "pgBackRest full (zstd 3, process-max $cores, aes-256)" pgbackrest-full "$cluster_bytes" "$pgbackrest_stored" -
    row "drctl logical backup" drctl-logical "$db_bytes" "$drctl_logical_stored" pg-dump
    row "pg_dump -Fc" pg-dump "$db_bytes" "$dump_stored" -
    row "drctl restore --to-database" drctl-restore "$db_bytes" - pg-restore
    row "pg_restore -j $cores" pg-restore "$db_bytes" - -
} | tee "$work/results.md"
