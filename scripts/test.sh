#!/usr/bin/env bash
# Run the test suite: installs the tools the tests shell out to (scripts/install-deps.sh:
# age, zstd, tar, sqlite3, PostgreSQL, MariaDB), starts moto (the S3, DynamoDB and KMS
# emulator the AWS tests use, see scripts/moto.sh), then
# `cargo test --locked`. Extra arguments go to cargo test, e.g.
#   scripts/test.sh restore::           # only tests whose name matches
#   scripts/test.sh -- --nocapture      # show test output
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
export DRCTL_MOTO_PORT=${DRCTL_MOTO_PORT:-5000}
bash scripts/moto.sh
exec cargo test --locked "$@"
