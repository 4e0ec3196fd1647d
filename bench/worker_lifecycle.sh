#!/usr/bin/env bash
# Worker lifecycle timings on the demo platform server (run scripts/demo.sh first):
# fast-shutdown time of the whole server with the worker running, and time from
# pg_terminate_backend(worker) to a new worker heartbeat. Bounded: N cycles (default 5).
set -euo pipefail
N=${1:-5}
BIN=/usr/lib/postgresql/${PG_MAJOR:-15}/bin
DIR=/var/tmp/poco_sync-demo/platform
q() { "$BIN/psql" -X -qAt -h 127.0.0.1 -p 55432 -U postgres -d platform -c "$1"; }
wait_idle() { for _ in $(seq 1 200); do [ "$(q "SELECT state FROM poco.worker" 2>/dev/null)" = idle ] && return 0; sleep 0.05; done; return 1; }
ms() { date +%s%3N; }
wait_idle
echo "cycle shutdown_ms respawn_ms"
for i in $(seq 1 "$N"); do
  t0=$(ms); runuser -u poco -- "$BIN/pg_ctl" stop -w -m fast -D "$DIR" >/dev/null; t1=$(ms)
  runuser -u poco -- "$BIN/pg_ctl" start -w -D "$DIR" -l /var/tmp/poco_sync-demo/platform.log >/dev/null
  wait_idle
  pid=$(q "SELECT pid FROM poco.worker")
  t2=$(ms); q "SELECT pg_terminate_backend($pid)" >/dev/null
  for _ in $(seq 1 200); do p=$(q "SELECT pid FROM poco.worker WHERE state = 'idle'"); [ -n "$p" ] && [ "$p" != "$pid" ] && break; sleep 0.05; done
  t3=$(ms)
  echo "$i $((t1 - t0)) $((t3 - t2))"
done
