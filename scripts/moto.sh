#!/usr/bin/env bash
# Install (once) and start (if not running) moto in server mode on 127.0.0.1:
# one server emulates S3, DynamoDB and KMS in every region.
#
#   scripts/moto.sh          install if needed, start if not running, wait until ready
#   scripts/moto.sh stop     stop the server this script started
#   scripts/moto.sh status   exit 0 if the server answers
#
# Environment:
#   DRCTL_MOTO_PORT   port (default 5000); tests read the same variable
#   DRCTL_MOTO_HOME   virtualenv and log directory (default ~/.cache/drctl/moto-5.2.5)
#
# Idempotent: safe to call before every test run. A server this script started from another
# version of scripts/moto_server.py (which mends some of moto's gaps) is restarted.
set -euo pipefail

moto_version=5.2.5
port=${DRCTL_MOTO_PORT:-5000}
home=${DRCTL_MOTO_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/drctl/moto-$moto_version}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=$home/venv/bin/python
pidfile=$home/moto-$port.pid
logfile=$home/moto-$port.log
stampfile=$home/moto-$port.server-sha256
stamp=$(sha256sum "$here/moto_server.py" | cut -d' ' -f1)

# Any HTTP answer counts: the probe must not depend on what the server holds (moto's
# /moto-api/data.json fails with 500 once some state is inconsistent).
answering() {
    python3 - "$port" <<'PY' >/dev/null 2>&1
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=2).read()
except urllib.error.HTTPError:
    pass
PY
}

install() {
    if [[ -x $python ]] && "$python" -c "import moto, sys; sys.exit(moto.__version__ != '$moto_version')" 2>/dev/null; then
        return
    fi
    echo "moto: installing moto[server]==$moto_version into $home/venv"
    mkdir -p "$home"
    python3 -m venv "$home/venv"
    "$home/venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$moto_version"
}

start() {
    if answering; then
        if [[ -f $pidfile && $(cat "$stampfile" 2>/dev/null) != "$stamp" ]]; then
            echo "moto: the server runs another scripts/moto_server.py; restarting it"
            stop
            for _ in $(seq 1 50); do
                answering || break
                sleep 0.2
            done
        else
            echo "moto: answering on 127.0.0.1:$port"
            return
        fi
    fi
    install
    echo "moto: starting on 127.0.0.1:$port (log: $logfile)"
    nohup setsid "$python" "$here/moto_server.py" -H 127.0.0.1 -p "$port" >"$logfile" 2>&1 </dev/null &
    echo $! >"$pidfile"
    echo "$stamp" >"$stampfile"
    for _ in $(seq 1 100); do
        if answering; then
            echo "moto: ready"
            return
        fi
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            echo "moto: the server exited; last lines of $logfile:" >&2
            tail -n 20 "$logfile" >&2
            exit 1
        fi
        sleep 0.2
    done
    echo "moto: not answering on 127.0.0.1:$port after 20 s; see $logfile" >&2
    exit 1
}

stop() {
    if [[ -f $pidfile ]]; then
        kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
        echo "moto: stopped"
    else
        echo "moto: no server started by this script on port $port"
    fi
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    status) answering ;;
    *)
        echo "usage: $0 [start|stop|status]" >&2
        exit 2
        ;;
esac
