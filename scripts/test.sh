#!/usr/bin/env bash
# The whole test suite: pure unit tests, #[pg_test] tests in one server, and end-to-end
# tests with real platform and learner servers (pg_test/). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_MAJOR=${PG_MAJOR:-15}
TEST_USER=${POCO_TEST_USER:-poco}
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
[ -x "$PG_CONFIG" ] || PG_CONFIG=/usr/bin/pg_config

bash scripts/setup.sh

# Every runner's output also goes to $LOG; the last line sums their "test result" lines.
LOG=$(mktemp /tmp/poco_sync-test.XXXXXX.log)
run() { "$@" 2>&1 | tee -a "$LOG"; }

echo "==> unit tests (no PostgreSQL)"
run cargo test -p poco_core

echo "==> #[pg_test] tests (one server run by $TEST_USER)"
PGRX_DATA=/var/tmp/poco_sync-pgrx-$PG_MAJOR
rm -rf "$PGRX_DATA" && mkdir -p "$PGRX_DATA" && chown "$TEST_USER" "$PGRX_DATA"
run cargo pgrx test "pg$PG_MAJOR" --runas "$TEST_USER" --pgdata "$PGRX_DATA/data"

echo "==> install the extension into PostgreSQL $PG_MAJOR"
cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null

echo "==> end-to-end tests (platform and learner servers started by pg_test/)"
export POCO_TEST_USER="$TEST_USER" POCO_PG_CONFIG="$PG_CONFIG"
run cargo test -p poco_e2e -- --test-threads=2 --show-output   # show-output: the isolation figures land in the log

# The watchdog (pg_test/src/watchdog.rs) checks every platform at the end of its scenario.
echo "poco_sync: the watchdog checked $(grep -c '^poco_e2e watchdog: .*; checked$' "$LOG" || true) scenarios"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "poco_sync: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' "$LOG"
rm -f "$LOG"
