#!/usr/bin/env bash
# Catch-up of continuous sync (issue #5): TARGETS families (default 1) sync continuously to
# their own databases on one learner server; the learner server is stopped, CHANGES
# single-row transactions (default 100,000: pgbench, 4 clients, inserts and updates of audit
# rows of those families) accumulate on the platform, then the learner server is started
# again. Measured: the time from its start until poco_sync_wait returns for every target,
# changes per second, and the stream processes' memory (peak resident, private) sampled
# during the catch-up. Every learner is then compared with its family's rows on the platform.
# Starts its own platform (127.0.0.1:55461) and learner (127.0.0.1:55462) under
# /var/tmp/poco_sync-bench-catchup as the non-root user; needs the extension installed
# (release build: cargo pgrx install --release --pg-config /usr/bin/pg_config).
# Output: bench/out/sync_catchup[_tTARGETS][_wSYNC_WORKERS].txt
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS=${TARGETS:-1}
CHANGES=${CHANGES:-100000}
SYNC_WORKERS=${SYNC_WORKERS:-2}
PG_MAJOR=${PG_MAJOR:-15}
BIN=/usr/lib/postgresql/$PG_MAJOR/bin
USER_=${POCO_TEST_USER:-poco}
BASE=/var/tmp/poco_sync-bench-catchup
OUT=bench/out
mkdir -p "$OUT" "$BASE"; chown "$USER_" "$BASE"
as_user() { runuser -u "$USER_" -- "$@"; }
P="-h 127.0.0.1 -p 55461 -U postgres"
L="-h 127.0.0.1 -p 55462 -U postgres"
qp() { "$BIN/psql" -X -v ON_ERROR_STOP=1 $P -d platform "$@"; }
ql() { local db=$1; shift; "$BIN/psql" -X -v ON_ERROR_STOP=1 $L -d "$db" "$@"; }
FIRST=21; LAST=$((20 + TARGETS))
FAMILIES=$(( TARGETS < 20 ? 20 : TARGETS ))

server() { # name port extra-conf
  local d=$BASE/$1
  if [ -f "$d/data/PG_VERSION" ]; then
    as_user "$BIN/pg_ctl" status -D "$d/data" >/dev/null 2>&1 && as_user "$BIN/pg_ctl" stop -w -m fast -D "$d/data" >/dev/null
    rm -rf "$d"
  fi
  mkdir -p "$d"; chown "$USER_" "$d"
  as_user "$BIN/initdb" -D "$d/data" -U postgres --auth=trust -E UTF8 >/dev/null
  printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\nmax_connections = %s\nshared_buffers = '256MB'\n%b" "$2" "$d" $((TARGETS + 100)) "$3" >> "$d/data/postgresql.conf"
  as_user "$BIN/pg_ctl" start -w -D "$d/data" -l "$d/server.log" >/dev/null
}
if [ ! -f "$BASE.key" ]; then head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$BASE.key"; fi
chown "$USER_" "$BASE.key"; chmod 600 "$BASE.key"
server platform 55461 "shared_preload_libraries = 'poco_sync'\npoco.database = 'platform'\npoco.key_file = '$BASE.key'\npoco.allow_private_targets = on\npoco.sync_workers = $SYNC_WORKERS\nmax_worker_processes = 16\n"
server learner 55462 ""
"$BIN/psql" -X -q $P -d postgres -c "CREATE DATABASE platform"
qp -qc "CREATE EXTENSION poco_sync" -f sample/schema.sql
qp -q -v parents="$FAMILIES" -f sample/data.sql
qp -q -o /dev/null -f sample/scope.sql

echo "enabling sync for $TARGETS families..."
for f in $(seq $FIRST $LAST); do
  ql postgres -qc "CREATE DATABASE fam$f"
  qp -qAt -c "SELECT poco_enable_sync($f, 'postgresql://postgres:x@127.0.0.1:55462/fam$f?sslmode=disable')" >/dev/null
done
for _ in $(seq 600); do
  left=$(qp -qAt -c "SELECT count(*) FROM poco.target WHERE sync_state <> 'streaming'")
  [ "$left" = 0 ] && break
  sleep 0.5
done
[ "$left" = 0 ] || { echo "targets did not reach streaming: $left left" >&2; exit 1; }

echo "learner down; $CHANGES transactions on the platform..."
as_user "$BIN/pg_ctl" stop -w -m fast -D "$BASE/learner/data" >/dev/null
cat > "$BASE/changes.sql" <<SQL
\\set f random($FIRST, $LAST)
\\set r random(1, 4)
INSERT INTO elearning.audit_log (user_id, action, detail) SELECT :f, 'catchup', jsonb_build_object('r', :r) WHERE :r > 1;
UPDATE elearning.audit_log SET detail = jsonb_build_object('updated', true) WHERE :r = 1 AND id = (SELECT max(id) FROM elearning.audit_log WHERE user_id = :f);
SQL
T0=$(date +%s.%N)
"$BIN/pgbench" $P -n -c 4 -j 2 -t $((CHANGES / 4)) -f "$BASE/changes.sql" platform > "$BASE/pgbench.txt" 2>&1
T1=$(date +%s.%N)
BACKLOG=$(qp -qAt -c "SELECT count(*) FROM poco.change")
LOGSIZE=$(qp -qAt -c "SELECT pg_size_pretty(pg_total_relation_size('poco.change'))")

echo "learner up; catching up $BACKLOG changes..."
# Sample the streams' memory while they catch up.
rm -f "$BASE/done" "$BASE/mem" "$BASE/connected"
( peak_hwm=0; peak_anon=0; seen=""
  while [ ! -f "$BASE/done" ]; do
    # When the stream's connection to the learner appears: the catch-up proper starts.
    if [ -z "$seen" ] && [ "$(ql postgres -qAt -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'poco_sync stream'" 2>/dev/null || echo 0)" != 0 ]; then
      seen=$(date +%s.%N); echo "$seen" > "$BASE/connected"
    fi
    for pid in $(qp -qAt -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'poco_sync stream'" 2>/dev/null); do
      read -r hwm anon < <(awk '/^VmHWM/ { h = $2 } /^RssAnon/ { a = $2 } END { print h + 0, a + 0 }' "/proc/$pid/status" 2>/dev/null || echo "0 0")
      [ "$hwm" -gt "$peak_hwm" ] && peak_hwm=$hwm
      [ "$anon" -gt "$peak_anon" ] && peak_anon=$anon
    done
    echo "$peak_hwm $peak_anon" > "$BASE/mem"
    sleep 0.2
  done ) &
SAMPLER=$!
S0=$(date +%s.%N)
as_user "$BIN/pg_ctl" start -w -D "$BASE/learner/data" -l "$BASE/learner/server.log" >/dev/null
for t in $(qp -qAt -c "SELECT id FROM poco.target ORDER BY id"); do
  [ "$(qp -qAt -c "SELECT poco_sync_wait($t, '30 min')")" = t ] || { echo "target $t did not catch up" >&2; exit 1; }
done
S1=$(date +%s.%N)
touch "$BASE/done"; wait $SAMPLER
read -r HWM ANON < "$BASE/mem"
C0=$(cat "$BASE/connected" 2>/dev/null || echo "$S0")
RESNAP=$(qp -qAt -c "SELECT count(*) FROM poco.events WHERE kind = 'sync_resnapshot'")

# Every learner equals its family's audit rows on the platform.
BAD=0
for f in $(seq $FIRST $LAST); do
  a=$(qp -qAt -c "SELECT count(*), coalesce(sum(hashtext(id || action || detail::text)), 0) FROM elearning.audit_log WHERE user_id IN (SELECT id FROM elearning.users WHERE id = $f OR parent_id = $f)")
  b=$(ql "fam$f" -qAt -c "SELECT count(*), coalesce(sum(hashtext(id || action || detail::text)), 0) FROM elearning.audit_log")
  [ "$a" = "$b" ] || { echo "family $f differs: platform $a, learner $b" >&2; BAD=$((BAD + 1)); }
done

{
echo "# sync_catchup: TARGETS=$TARGETS CHANGES=$CHANGES SYNC_WORKERS=$SYNC_WORKERS, $(nproc) cores, PostgreSQL $("$BIN/postgres" --version | awk '{print $3}'), $(date -u +%F)"
echo "backlog while the learner was down: $BACKLOG captured changes ($LOGSIZE of poco.change), written in $(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.1f", b - a }') s"
echo "catch-up: learner start to poco_sync_wait true for every target $(awk -v a="$S0" -v b="$S1" 'BEGIN { printf "%.2f", b - a }') s (includes the reconnect backoff); from the stream's reconnection $(awk -v a="$C0" -v b="$S1" 'BEGIN { printf "%.2f", b - a }') s, $(awk -v a="$C0" -v b="$S1" -v n="$BACKLOG" 'BEGIN { printf "%.0f", n / (b - a) }') changes/s; re-snapshots: $RESNAP"
echo "stream processes during the catch-up: peak VmHWM $HWM kB, peak RssAnon $ANON kB"
echo "learners equal to their family's rows: $((TARGETS - BAD)) of $TARGETS"
} | tee "$OUT/sync_catchup$([ "$TARGETS" = 1 ] || echo "_t$TARGETS")$([ "$SYNC_WORKERS" = 2 ] || echo "_w$SYNC_WORKERS").txt"
[ "${KEEP:-0}" = 1 ] || for s in platform learner; do as_user "$BIN/pg_ctl" stop -w -m fast -D "$BASE/$s/data" >/dev/null; done
[ "$BAD" = 0 ]
