#!/usr/bin/env bash
# Run the test suite: installs the tools the tests shell out to (age, zstd, tar,
# sqlite3), then `cargo test --locked`. Extra arguments go to cargo test, e.g.
#   scripts/test.sh restore::           # only tests whose name matches
#   scripts/test.sh -- --nocapture      # show test output
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
bash scripts/moto.sh
exec cargo test --locked "$@"
