#!/usr/bin/env bash
# Set up drctl on this machine with the embedded defaults (local directory
# repository, SQLite registry, a fresh age key) and run the example jobs end to end:
# back up /etc and the package list, list and deep-verify the backups, restore
# /etc into demo/restore/ and compare it with the live one.
#
# Everything lives in demo/ (gitignored). Safe to run again: existing keys,
# repository and registry are reused and each run adds new backups.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
demo=$root/demo
drctl=$root/target/release/drctl

step() { printf '\n==> %s\n' "$*"; }

# Runs drctl and stops the demo with drctl's exit code if it fails.
run_drctl() {
    local rc=0 meaning
    "$drctl" "$@" || rc=$?
    if ((rc != 0)); then
        case $rc in
            2) meaning="invalid input" ;;
            3) meaning="partial: some backups failed verification" ;;
            4) meaning="integrity error" ;;
            10) meaning="not found or not initialised" ;;
            11) meaning="locked: another run holds the lease" ;;
            12) meaning="wrong key" ;;
            130) meaning="cancelled" ;;
            *) meaning="failure" ;;
        esac
        echo "error: 'drctl $*' failed with exit code $rc ($meaning)" >&2
        exit "$rc"
    fi
}

step "installing tools"
bash scripts/install-deps.sh

step "building drctl (release)"
cargo build --release --locked

step "writing demo/drctl.yaml"
mkdir -p "$demo/keys"
chmod 700 "$demo/keys"
if [[ -e $demo/drctl.yaml ]]; then
    echo "demo/drctl.yaml exists; keeping it"
else
    # Relative paths resolve against the directory of drctl.yaml (demo/).
    cat >"$demo/drctl.yaml" <<'YAML'
environment: demo
repository: file://repo
registry: sqlite://registry.db
recipients-file: keys/recipients.txt
identity-file: keys/identity.txt
policies-dir: ../policies
YAML
    echo "created demo/drctl.yaml"
fi

export DRCTL_CONFIG=$demo/drctl.yaml

step "drctl init"
run_drctl init

step "drctl policy validate"
run_drctl policy validate

step "drctl backup --policy system-config"
run_drctl backup --policy system-config

step "drctl backup --policy installed-packages"
run_drctl backup --policy installed-packages

step "drctl list"
run_drctl list

step "drctl verify --latest --policy system-config --deep"
run_drctl verify --latest --policy system-config --deep

restore_dir=$demo/restore/system-config
step "drctl restore --backup latest --policy system-config --target demo/restore/system-config"
mkdir -p "$demo/restore"
run_drctl restore --backup latest --policy system-config --target "$restore_dir" --overwrite

# The policy excludes some of /etc (shadow files, swap files), and other parts
# change on their own, so compare a stable subtree. Symlinks are compared as links.
step "comparing /etc/apt with the restored copy"
compare=/etc/apt
if diff -r --no-dereference "$compare" "$restore_dir$compare"; then
    diff_result="identical"
else
    echo "error: restored $compare differs from the live one (see above)" >&2
    exit 1
fi

restored_files=$(find "$restore_dir" -type f | wc -l)
repo_size=$(du -sh "$demo/repo" | cut -f1)
# Newest system-config artifact (backup IDs start with their UTC time, so they sort).
artifact=$(find "$demo/repo" -path '*/system-config/*' -name 'data.*.zst.age' | sort | tail -n 1)
artifact=${artifact#"$root"/}

cat <<SUMMARY

==> done
  config        demo/drctl.yaml (DRCTL_CONFIG=demo/drctl.yaml)
  policies      policies/system-config.yaml, policies/installed-packages.yaml
  repository    demo/repo ($repo_size, encrypted with age)
  registry      demo/registry.db (SQLite)
  age identity  demo/keys/identity.txt (keep it secret; it decrypts every backup)
  recipients    demo/keys/recipients.txt (public keys backups are encrypted to)
  restore       demo/restore/system-config ($restored_files files); $compare is $diff_result to the live copy

Try:
  DRCTL_CONFIG=demo/drctl.yaml target/release/drctl list
  DRCTL_CONFIG=demo/drctl.yaml target/release/drctl restore --backup latest --policy installed-packages --target demo/restore/installed-packages --overwrite
Without drctl (break-glass): each artifact is age over zstd (over tar for file trees):
  age -d -i demo/keys/identity.txt ${artifact:-demo/repo/<environment>/<policy>/<backup-id>/data.*.zst.age} | zstd -d | tar -tv
SUMMARY
