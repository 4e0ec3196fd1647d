#!/usr/bin/env bash
# Continuous sync latency and capture cost (issue #5), side by side with PostgreSQL's own
# logical replication, on this machine:
#   1. FAMILIES families (default 100) sync continuously, each to its own database on one
#      learner server; pgbench inserts audit rows for random families at RATE rows/s (default
#      1000) for DURATION seconds (default 20), optionally through a proxy adding RTT_MS
#      of round trip (bench/delay_proxy.py). Each learner database records, by trigger, when each row
#      arrived; latency = arrival (clock_timestamp on the learner) - the row's own
#      clock_timestamp() on the platform, both servers on this machine's clock.
#   2. The same load on a table carrying the family id directly, published with a row filter
#      (family = first family) to a logical replication subscription: same measurement.
#   3. Platform write throughput: pgbench at full speed for THROUGHPUT_SECONDS (default 10) on
#      the scoped table, with the families syncing, with sync off (twice, around the next
#      run), and with the capture triggers alone (nobody delivering).
# SYNC_WORKERS (default 2) stream processes split the targets (poco.sync_workers).
# Starts its own platform (127.0.0.1:55451, wal_level = logical) and learner (127.0.0.1:55452)
# under /var/tmp/poco_sync-bench-sync as the non-root user; needs the extension installed
# (release build: cargo pgrx install --release --pg-config /usr/bin/pg_config).
# Output: bench/out/sync_latency.txt
set -euo pipefail
cd "$(dirname "$0")/.."
FAMILIES=${FAMILIES:-100}
RATE=${RATE:-1000}
SECONDS_=${DURATION:-20}
THROUGHPUT_SECONDS=${THROUGHPUT_SECONDS:-10}
RTT_MS=${RTT_MS:-0}
SYNC_WORKERS=${SYNC_WORKERS:-2}
BASE=/var/tmp/poco_sync-bench-sync
PPORT=55451; LPORT=55452; PARENTS=$FAMILIES; MAX_CONNECTIONS=$((FAMILIES + 200))
PLATFORM_CONF="poco.sync_workers = $SYNC_WORKERS\nwal_level = logical\n"
FIRST=21; LAST=$((20 + FAMILIES))
. bench/sync_common.sh
start_servers

# RTT_MS > 0: the learner (and, for logical replication, the platform as the subscriber sees
# it) is reached through bench/delay_proxy.py, which adds that round-trip time.
if [ "$RTT_MS" != 0 ]; then
  pkill -f "delay_proxy.py 5545[34]" 2>/dev/null || true
  python3 bench/delay_proxy.py 55453 55452 "$RTT_MS" & PROXY1=$!
  python3 bench/delay_proxy.py 55454 55451 "$RTT_MS" & PROXY2=$!
  trap 'kill $PROXY1 $PROXY2 2>/dev/null || true' EXIT
  LPORT=55453; PPORT=55454
  sleep 0.5
fi

echo "enabling sync for $FAMILIES families..."
enable_families "$LPORT"
# Each learner database notes when each benchmark row arrived.
for f in $(seq $FIRST $LAST); do
  ql "fam$f" -q <<'SQL'
CREATE TABLE public.arrival (at_platform timestamptz, at_learner timestamptz);
CREATE FUNCTION public.note_arrival() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN IF NEW.action = 'bench' THEN INSERT INTO public.arrival VALUES (NEW.at, clock_timestamp()); END IF; RETURN NULL; END $$;
CREATE TRIGGER note_arrival AFTER INSERT ON elearning.audit_log FOR EACH ROW EXECUTE FUNCTION public.note_arrival();
SQL
done

# Logical replication of a table carrying the family id, row filter on the first family.
qp -q <<SQL
CREATE TABLE public.lr_events (id bigserial PRIMARY KEY, family bigint NOT NULL, at timestamptz NOT NULL);
CREATE PUBLICATION lr_bench FOR TABLE public.lr_events WHERE (family = $FIRST);
SQL
ql postgres -qc "CREATE DATABASE lr"
ql lr -q <<SQL
CREATE TABLE public.lr_events (id bigint PRIMARY KEY, family bigint NOT NULL, at timestamptz NOT NULL,
                               at_learner timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE SUBSCRIPTION lr_bench CONNECTION 'host=127.0.0.1 port=$PPORT user=postgres dbname=platform' PUBLICATION lr_bench;
SQL
sleep 2

cat > "$BASE/poco.sql" <<SQL
\\set f random($FIRST, $LAST)
INSERT INTO elearning.audit_log (user_id, action, at) VALUES (:f, 'bench', clock_timestamp());
SQL
cat > "$BASE/lr.sql" <<SQL
\\set f random($FIRST, $LAST)
INSERT INTO public.lr_events (family, at) VALUES (:f, clock_timestamp());
SQL
pct() { # file of latencies (ms) -> "p50 p99 n"
  sort -g "$1" | awk '{ v[NR] = $1 } END { if (NR == 0) { print "- - 0"; exit } printf "%.2f %.2f %d", v[int(NR * 0.5) + (NR * 0.5 > int(NR * 0.5))], v[int(NR * 0.99) + (NR * 0.99 > int(NR * 0.99))], NR }'
}

echo "poco_sync: $RATE rows/s over $FAMILIES families for $SECONDS_ s..."
qp -qc "CHECKPOINT"
"$BIN/pgbench" $P -n -c 4 -j 2 -R "$RATE" -T "$SECONDS_" -f "$BASE/poco.sql" platform > "$BASE/pgbench_poco.txt" 2>&1
STREAM_RSS=""
for pid in $(qp -qAt -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'poco_sync stream' ORDER BY pid"); do
  STREAM_RSS+="pid $pid: $(awk '/^(VmHWM|RssAnon)/ { printf "%s %s %s; ", $1, $2, $3 }' "/proc/$pid/status" 2>/dev/null || echo "?") "
done
for t in $(qp -qAt -c "SELECT id FROM poco.target ORDER BY id"); do
  [ "$(qp -qAt -c "SELECT poco_sync_wait($t, '5 min')")" = t ] || { echo "target $t did not catch up" >&2; exit 1; }
done
: > "$BASE/poco_ms.txt"
for f in $(seq $FIRST $LAST); do
  ql "fam$f" -qAt -c "SELECT extract(epoch FROM at_learner - at_platform) * 1000 FROM public.arrival" >> "$BASE/poco_ms.txt"
done
read -r P50 P99 N <<< "$(pct "$BASE/poco_ms.txt")"
SENT=$(qp -qAt -c "SELECT count(*) FROM elearning.audit_log WHERE action = 'bench'")

echo "logical replication: the same load on the filtered table..."
"$BIN/pgbench" $P -n -c 4 -j 2 -R "$RATE" -T "$SECONDS_" -f "$BASE/lr.sql" platform > "$BASE/pgbench_lr.txt" 2>&1
sleep 2
ql lr -qAt -c "SELECT extract(epoch FROM at_learner - at) * 1000 FROM public.lr_events" > "$BASE/lr_ms.txt"
read -r LP50 LP99 LN <<< "$(pct "$BASE/lr_ms.txt")"

echo "platform throughput, capture on and off..."
# Each run after a CHECKPOINT (a checkpoint landing in one run and not another moved the
# figures by 10 %).
tps() { qp -qc "CHECKPOINT"; "$BIN/pgbench" $P -n -c 4 -j 2 -T "$THROUGHPUT_SECONDS" -f "$BASE/poco.sql" platform 2>/dev/null | awk '/^tps/ { printf "%.0f", $3 }'; }
ON=$(tps)
for f in $(seq $FIRST $LAST); do qp -qAt -c "SELECT poco_disable_sync($f)" >/dev/null; done
# Sync off and the capture triggers alone (nobody delivering: what the platform's own writes
# pay; the run above also shares the 2 cores with the streams and the learner databases),
# alternated CAPTURE_ROUNDS times (default 3): single 10 s runs move by +-5 %.
OFFS=(); CAPS=()
for _ in $(seq "${CAPTURE_ROUNDS:-3}"); do
  OFFS+=("$(tps)")
  qp -qc "CREATE TRIGGER poco_capture AFTER INSERT OR UPDATE OR DELETE ON elearning.audit_log FOR EACH ROW EXECUTE FUNCTION poco.capture()"
  CAPS+=("$(tps)")
  qp -qc "DROP TRIGGER poco_capture ON elearning.audit_log" -c "TRUNCATE poco.change"
done
median() { printf "%s\n" "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
OFF=$(median "${OFFS[@]}"); CAPTURE_ONLY=$(median "${CAPS[@]}")

{
echo "# sync_latency: FAMILIES=$FAMILIES RATE=$RATE DURATION=$SECONDS_ RTT_MS=$RTT_MS SYNC_WORKERS=${SYNC_WORKERS:-2}, $(nproc) cores, PostgreSQL $("$BIN/postgres" --version | awk '{print $3}'), $(date -u +%F)"
echo "poco_sync   : $SENT rows sent, $N arrivals measured; latency p50 $P50 ms, p99 $P99 ms"
echo "logical rep.: $LN rows of family $FIRST (row filter); latency p50 $LP50 ms, p99 $LP99 ms"
echo "platform pgbench (4 clients, one audit row per transaction, $THROUGHPUT_SECONDS s runs): sync off median $OFF tps (${OFFS[*]}); capture triggers only median $CAPTURE_ONLY tps (${CAPS[*]}), $(awk -v a="$CAPTURE_ONLY" -v b="$OFF" 'BEGIN { printf "%+.1f%%", (a / b - 1) * 100 }'); capture + streams + $FAMILIES learners on the same cores $ON tps ($(awk -v a="$ON" -v b="$OFF" 'BEGIN { printf "%+.0f%%", (a / b - 1) * 100 }'))"
echo "stream processes at the end of the run: $STREAM_RSS"
echo "pgbench at $RATE/s, poco run: $(grep -E '^(latency average|tps)' "$BASE/pgbench_poco.txt" | tr '\n' ' ')"
} | tee "$OUT/sync_latency$([ "$RTT_MS" = 0 ] || echo "_rtt$RTT_MS")$([ "$FAMILIES" = 100 ] || echo "_$FAMILIES")$([ "${SYNC_WORKERS:-2}" = 2 ] || echo "_w${SYNC_WORKERS}")$([ "$RATE" = 1000 ] || echo "_r$RATE").txt"
# KEEP=1 leaves both servers running (for a look at the learners' arrival tables).
stop_servers
