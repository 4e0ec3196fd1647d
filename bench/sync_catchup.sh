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
BASE=/var/tmp/poco_sync-bench-catchup
FIRST=21; LAST=$((20 + TARGETS))
PPORT=55461; LPORT=55462; PARENTS=$(( TARGETS < 20 ? 20 : TARGETS )); MAX_CONNECTIONS=$((TARGETS + 100))
PLATFORM_CONF="poco.sync_workers = $SYNC_WORKERS\n"
. bench/sync_common.sh
start_servers

echo "enabling sync for $TARGETS families..."
enable_families "$LPORT"

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
stop_servers
[ "$BAD" = 0 ]
