#!/usr/bin/env bash
# Soak (issue #6): the kill -9 scenario of pg_test/tests/sync_lifecycle.rs at length.
# CYCLES (default 1,000) times, after a random pause, a random poco_sync process (a stream,
# the coordinator, or a push job) is killed with SIGKILL while two families sync and a third
# is pushed now and then, under a writer; the server restarts each time. At the end the
# history checker compares every learner with its parent's scope (lost, duplicated, stale,
# leaked: the goal is 0, 0, 0, 0), and the secrets sweep runs over the verbose log.
# SEED replays a run. Uses the test harness (its own servers, as the non-root test user) and
# the installed extension (the debug build of `cargo pgrx install` is what CI tests).
# Output: bench/out/soak_kill_CYCLES.txt
set -euo pipefail
cd "$(dirname "$0")/.."
CYCLES=${CYCLES:-1000}
SEED=${SEED:-12648430}
mkdir -p bench/out
out="bench/out/soak_kill_${CYCLES}.txt"
start=$(date +%s)
{
  echo "# soak_kill: $CYCLES kill -9 cycles, seed $SEED, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
  (cd pg_test && POCO_KILL_CYCLES=$CYCLES POCO_KILL_SEED=$SEED \
     cargo test --test sync_lifecycle kill_9 -- --nocapture 2>&1) \
    | grep -E "^kill -9 cycles|^history checker|^recorded history|^test result|panicked|assert" || true
  echo "wall: $(( $(date +%s) - start )) s"
} | tee "$out"
grep -q "test result: ok" "$out"
