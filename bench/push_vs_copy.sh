#!/usr/bin/env bash
# Push speed and memory: one big account (SIZE_MB of COPY data, default 1024) pushed by
# poco_push, against the same rows moved by
#   (a) psql COPY (scoped query) TO STDOUT (FORMAT binary) | psql COPY FROM STDIN, table by
#       table, followed by the same index, key and foreign-key builds (pg_dump post-data);
#   (b) pg_dump of the schema holding those tables (the big account is nearly all of it) | psql -1;
#   (c) pg_dump --inserts of that schema | psql -1 (what row-by-row tools do).
# Starts its own platform (127.0.0.1:55441) and learner (127.0.0.1:55442) servers as the
# non-root user under /var/tmp/poco_sync-bench-push; needs the extension installed
# (a release build: `cargo pgrx install --release --pg-config /usr/bin/pg_config`). Each method
# runs ROUNDS times (default 3), interleaved, each after a CHECKPOINT of both servers and a
# sync; the medians are compared. While a push runs, the job process's memory is sampled
# from /proc every 50 ms (VmHWM: peak resident; RssAnon: private memory).
# Output: bench/out/push_vs_copy_<SIZE_MB>MB.txt
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${SIZE_MB:-1024}
PARENT=21
BASE=/var/tmp/poco_sync-bench-push
PPORT=55441; LPORT=55442
. bench/env.sh
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

server() { # name port extra-conf
  local d=$BASE/$1
  if [ ! -f "$d/data/PG_VERSION" ]; then
    mkdir -p "$d"; chown "$USER_" "$d"
    as_user "$BIN/initdb" -D "$d/data" -U postgres --auth=trust -E UTF8 >/dev/null
    printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\nshared_buffers = '1GB'\nmax_wal_size = '8GB'\nmaintenance_work_mem = '256MB'\n%b" "$2" "$d" "$3" >> "$d/data/postgresql.conf"
  fi
  as_user "$BIN/pg_ctl" status -D "$d/data" >/dev/null 2>&1 && as_user "$BIN/pg_ctl" stop -w -m fast -D "$d/data" >/dev/null
  as_user "$BIN/pg_ctl" start -w -D "$d/data" -l "$d/server.log" >/dev/null
}
if [ ! -f "$BASE/key" ]; then head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$BASE/key"; fi
chown "$USER_" "$BASE/key"; chmod 600 "$BASE/key"
server platform "$PPORT" "shared_preload_libraries = 'poco_sync'\npoco.database = 'platform'\npoco.key_file = '$BASE/key'\npoco.allow_private_targets = on\n"
server learner "$LPORT" ""

have=$(qp -qAt -c "SELECT coalesce((SELECT (detail->>'size_mb')::int FROM poco.events WHERE kind = 'bench_loaded' ORDER BY id DESC LIMIT 1), 0)" 2>/dev/null || echo 0)
if [ "$have" != "$SIZE_MB" ]; then
  # The worker holds a connection to poco.database: point it elsewhere while we recreate it.
  "$BIN/psql" -X -q $P -d postgres -c "ALTER SYSTEM SET poco.database = 'postgres'" -c "SELECT pg_reload_conf()" >/dev/null
  sleep 2
  "$BIN/psql" -X -q $P -d postgres -c "DROP DATABASE IF EXISTS platform WITH (FORCE)" -c "CREATE DATABASE platform" \
    -c "ALTER SYSTEM RESET poco.database" -c "SELECT pg_reload_conf()" >/dev/null
  qp -qc "CREATE EXTENSION poco_sync" -f sample/schema.sql
  qp -q -v parents=20 -f sample/data.sql
  qp -q -o /dev/null -f sample/scope.sql
  echo "growing parent $PARENT's account to ~${SIZE_MB} MB..."
  t0=$(now)
  # About 1 kB of COPY text per audit row, spread over the family's users.
  qp -qc "INSERT INTO elearning.audit_log (user_id, action, at, detail)
          SELECT u.id, 'page_view', '2026-01-01'::timestamptz + g * interval '1 s',
                 jsonb_build_object('page', g, 'path', '/course/' || (g % 500) || '/lesson/' || (g % 20),
                                    'agent', 'Mozilla/5.0 (X11; Linux x86_64) poco-bench', 'pad', repeat(md5(g::text), 26))
            FROM generate_series(1, $SIZE_MB * 1000) g
            JOIN LATERAL (SELECT id FROM elearning.users WHERE id = $PARENT OR parent_id = $PARENT ORDER BY id OFFSET (g % 3) LIMIT 1) u ON true"
  qp -qc "VACUUM ANALYZE" -c "INSERT INTO poco.events (kind, message, detail) VALUES ('bench_loaded', 'bench data', jsonb_build_object('size_mb', $SIZE_MB))"
  echo "loaded in $(secs "$t0" "$(now)") s"
fi

fresh() { ql postgres -qc "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1"; }
# Every measured run starts from the same state: both servers checkpointed (so WAL segments are
# recycled, not zero-filled, and no checkpoint from an earlier run overlaps) and dirty pages
# written out. Without it, whichever method runs first pays for the others' WAL.
settle() {
  qp -qc "CHECKPOINT" >/dev/null; ql postgres -qc "CHECKPOINT" >/dev/null; sync
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f", m }'; }
runs() { local name=$1; shift; echo "$(median <<< "$*") s (median of $#: $*)"; }

# poco_push, with memory sampling of the job process.
fresh poco
TARGET=$(qp -qAt -c "SELECT poco_add_target($PARENT, 'postgresql://postgres:x@127.0.0.1:$LPORT/poco?sslmode=disable')")
run_push() {
  local job pid=0 peak_hwm=0 peak_anon=0 k v t0 t1 i
  t0=$(now)
  job=$(qp -qAt -c "SELECT poco_push($PARENT, $TARGET)")
  # Find the job's process once, then sample its /proc status with shell builtins only, so
  # the sampling itself (no psql, no awk) takes next to no CPU from the push.
  for i in $(seq 500); do
    pid=$(qp -qAt -c "SELECT coalesce(pid, 0) FROM poco.jobs WHERE job_id = $job AND state = 'running'")
    [ -n "$pid" ] && [ "$pid" != 0 ] && break
    sleep 0.01
  done
  while [ -n "$pid" ] && [ "$pid" != 0 ] && [ -r "/proc/$pid/status" ]; do
    while read -r k v _; do
      case $k in
        VmHWM:) [ "$v" -gt "$peak_hwm" ] && peak_hwm=$v ;;
        RssAnon:) [ "$v" -gt "$peak_anon" ] && peak_anon=$v ;;
      esac
    done < "/proc/$pid/status" 2>/dev/null || true
    sleep 0.05
  done
  state=$(qp -qAt -c "SELECT poco_wait($job, '30 min')")
  t1=$(now)
  [ "$state" = succeeded ] || { qp -c "SELECT error FROM poco.jobs WHERE job_id = $job"; exit 1; }
  PUSH=$(secs "$t0" "$t1")
  JOBINFO=$(qp -qAt -c "SELECT rows_done || ' rows, ' || pg_size_pretty(bytes_done) || ' COPY data' FROM poco.jobs WHERE job_id = $job")
  [ $((peak_hwm / 1024)) -gt "$HWM" ] && HWM=$((peak_hwm / 1024))
  [ $((peak_anon / 1024)) -gt "$ANON" ] && ANON=$((peak_anon / 1024))
  return 0
}

# (a) binary COPY pipes of the scoped queries, then the same index/key/FK builds.
run_a() {
  fresh copy_a
  # The learner's schema as poco_sync made it (sent columns only; the keys, indexes and
  # foreign keys it builds): the same table shapes and the same builds for (a).
  "$BIN/pg_dump" $L -d poco -s --section=pre-data -n elearning | ql copy_a -q >/dev/null
  settle
  local ta=$(now) name sql cols q
  while IFS='|' read -r name sql; do
    cols=$(sed -E 's/^SELECT (.*) FROM .*/\1/; s/\bt\.//g' <<< "$sql" | sed -E 's/ FROM .*//')
    q=${sql//\$1/\'$PARENT\'}
    "$BIN/psql" -X -q $P -d platform -c "\\copy ($q) TO STDOUT (FORMAT binary)" \
      | ql copy_a -q -c "\\copy $name ($cols) FROM STDIN (FORMAT binary)"
  done < <(qp -qAt -F'|' -c "SELECT table_name, select_sql FROM poco.scope_tables")
  "$BIN/pg_dump" $L -d poco -s --section=post-data -n elearning | ql copy_a -q >/dev/null
  A_RUNS+="$(secs "$ta" "$(now)") "
  A_BYTES=$(ql copy_a -qAt -c "SELECT pg_database_size('copy_a')")
}

# (b) pg_dump | psql, same tables, one transaction.
run_b() {
  fresh copy_b; settle
  local ta=$(now)
  "$BIN/pg_dump" $P -d platform -n elearning | ql copy_b -q -1 >/dev/null
  B_RUNS+="$(secs "$ta" "$(now)") "
}

ROUNDS=${ROUNDS:-3}
HWM=0; ANON=0; FIRST_RUNS=; SECOND_RUNS=; A_RUNS=; B_RUNS=
for r in $(seq "$ROUNDS"); do
  echo "round $r of $ROUNDS..."
  fresh poco; settle; run_push; FIRST_RUNS+="$PUSH "
  settle; run_push; SECOND_RUNS+="$PUSH "   # over the existing copy: drops and reloads
  run_a
  run_b
done

# (c) pg_dump --inserts | psql, one transaction (once: it is an order of magnitude slower).
fresh copy_c; settle
ta=$(now)
"$BIN/pg_dump" $P -d platform --inserts -n elearning | ql copy_c -q -1 >/dev/null
C=$(secs "$ta" "$(now)")
A=$(median <<< "$A_RUNS"); B=$(median <<< "$B_RUNS"); FIRST=$(median <<< "$FIRST_RUNS")

{
echo "# push_vs_copy: SIZE_MB=$SIZE_MB parent=$PARENT, $(nproc) cores, PostgreSQL $("$BIN/postgres" --version | awk '{print $3}'), $(date -u +%F)"
echo "each run starts after CHECKPOINT on both servers and sync; times are medians of $ROUNDS rounds"
echo "account on the learner after (a): $(( A_BYTES / 1024 / 1024 )) MB (database size); $JOBINFO"
echo "(a) binary COPY pipes + index builds : $(runs a $A_RUNS)"
echo "(b) pg_dump | psql -1                : $(runs b $B_RUNS)"
echo "(c) pg_dump --inserts | psql -1      : $C s (one run)"
echo "poco_push into an empty database     : $(runs p $FIRST_RUNS)"
echo "poco_push over the previous copy     : $(runs p $SECOND_RUNS)"
echo "push / (a): $(awk -v p="$FIRST" -v a="$A" 'BEGIN { printf "%+.0f%%", (p / a - 1) * 100 }'); push / (b): $(awk -v p="$FIRST" -v b="$B" 'BEGIN { printf "%+.0f%%", (p / b - 1) * 100 }')"
echo "job process peak over all pushes: VmHWM $HWM MB (includes shared buffers it touched), RssAnon $ANON MB (private memory)"
} | tee "$OUT/push_vs_copy_${SIZE_MB}MB.txt"
