#!/usr/bin/env bash
# Account-scope evaluation at platform scale. Starts its own server (as the non-root user,
# 127.0.0.1:55440, data under /var/tmp/poco_sync-bench), loads the sample platform with
# PARENTS families (default 10000: about 5.2 million rows), declares the sample scope, then:
#   1. times evaluating one parent's whole scope (every scoped table's compiled query), for
#      SAMPLES parents (default 300): count only, and reading every row as text;
#   2. per-table medians;
#   3. EXPLAIN (ANALYZE, BUFFERS) of every table's query for one parent, into bench/out/;
#   4. poco_scope_preview and compile times.
# Needs the extension installed (scripts/demo.sh or scripts/test.sh do that). Re-runs reuse
# the loaded data. Output: bench/out/scope_eval.txt and bench/out/scope_plans.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PARENTS=${PARENTS:-10000}
SAMPLES=${SAMPLES:-300}
PG_MAJOR=${PG_MAJOR:-15}
BIN=/usr/lib/postgresql/$PG_MAJOR/bin
USER_=${POCO_TEST_USER:-poco}
BASE=/var/tmp/poco_sync-bench
PORT=55440
OUT=bench/out
mkdir -p "$OUT" "$BASE"; chown "$USER_" "$BASE"
as_user() { runuser -u "$USER_" -- "$@"; }
q() { "$BIN/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p $PORT -U postgres -d platform "$@"; }

if [ ! -f "$BASE/data/PG_VERSION" ]; then
  as_user "$BIN/initdb" -D "$BASE/data" -U postgres --auth=trust -E UTF8 >/dev/null
  cat >> "$BASE/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$BASE'
shared_preload_libraries = 'poco_sync'
poco.database = 'platform'
shared_buffers = '2GB'
work_mem = '16MB'
max_wal_size = '8GB'
CONF
fi
as_user "$BIN/pg_ctl" status -D "$BASE/data" >/dev/null 2>&1 && as_user "$BIN/pg_ctl" stop -w -m fast -D "$BASE/data" >/dev/null
as_user "$BIN/pg_ctl" start -w -D "$BASE/data" -l "$BASE/server.log" >/dev/null

have=$("$BIN/psql" -X -qAt -h 127.0.0.1 -p $PORT -U postgres -d postgres -c \
  "SELECT 1 FROM pg_database WHERE datname = 'platform'")
loaded=0
if [ "$have" = 1 ]; then
  loaded=$(q -qAt -c "SELECT CASE WHEN to_regclass('elearning.users') IS NULL THEN 0 ELSE (SELECT count(*) FROM elearning.users WHERE role = 'parent') END")
fi
if [ "$loaded" != "$PARENTS" ]; then
  "$BIN/psql" -X -q -h 127.0.0.1 -p $PORT -U postgres -d postgres -c "DROP DATABASE IF EXISTS platform" -c "CREATE DATABASE platform"
  q -qc "CREATE EXTENSION poco_sync" -f sample/schema.sql
  echo "loading $PARENTS families..."
  t0=$(date +%s)
  q -q -v parents="$PARENTS" -f sample/data.sql
  echo "loaded in $(( $(date +%s) - t0 )) s"
  q -q -o /dev/null -f sample/scope.sql
  q -qc "VACUUM ANALYZE"
fi

{
echo "# scope_eval: PARENTS=$PARENTS SAMPLES=$SAMPLES, $(nproc) cores, PostgreSQL $("$BIN/postgres" --version | awk '{print $3}')"
q -qAt -F ' ' -c "SELECT 'rows in the platform:', sum(n_live_tup)::bigint FROM pg_stat_user_tables WHERE schemaname = 'elearning'"
q -qAt -F ' ' -c "SELECT relname, n_live_tup FROM pg_stat_user_tables WHERE schemaname = 'elearning' ORDER BY n_live_tup DESC"
q -q <<SQL
CREATE TEMP TABLE qs AS SELECT table_name, select_sql FROM poco.scope_tables;
CREATE TEMP TABLE runs (round int, parent bigint, table_name text, mode text, ms float8, nrows bigint);
DO \$\$
DECLARE p bigint; r record; t0 timestamptz; c bigint; rnd int; m text;
BEGIN
  FOR rnd IN 1..2 LOOP                       -- round 1 warms the cache; round 2 is reported
    FOR p IN SELECT 21 + (i * 7919) % $PARENTS FROM generate_series(1, $SAMPLES) i LOOP
      FOR r IN SELECT * FROM qs LOOP
        FOREACH m IN ARRAY ARRAY['count', 'read'] LOOP
          t0 := clock_timestamp();
          IF m = 'count' THEN
            EXECUTE format('SELECT count(*) FROM (%s) q', r.select_sql) INTO c USING p::text;
          ELSE
            EXECUTE format('SELECT count(length(q::text)) FROM (%s) q', r.select_sql) INTO c USING p::text;
          END IF;
          INSERT INTO runs VALUES (rnd, p, r.table_name, m,
                                   extract(epoch FROM clock_timestamp() - t0) * 1000, c);
        END LOOP;
      END LOOP;
    END LOOP;
  END LOOP;
END \$\$;
\echo
\echo '## one parent, whole scope (sum over the 8 scoped tables), warm cache'
SELECT mode, count(*) AS parents, round(avg(nrows)) AS avg_rows,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2) AS p50_ms,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ms)::numeric, 2) AS p95_ms,
       round(max(ms)::numeric, 2) AS max_ms
  FROM (SELECT parent, mode, sum(ms) AS ms, sum(nrows) AS nrows FROM runs WHERE round = 2 GROUP BY 1, 2) s
 GROUP BY mode ORDER BY mode;
\echo '## per table (read mode), warm cache'
SELECT table_name, round(avg(nrows), 1) AS avg_rows,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 3) AS p50_ms,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ms)::numeric, 3) AS p95_ms
  FROM runs WHERE round = 2 AND mode = 'read' GROUP BY 1 ORDER BY 3 DESC;
\echo '## compile (catalog read + path resolution + SQL) and preview for parent 21'
DO \$\$
DECLARE t0 timestamptz; n int;
BEGIN
  t0 := clock_timestamp();
  FOR i IN 1..20 LOOP SELECT count(*) INTO n FROM poco.scope_tables; END LOOP;
  RAISE NOTICE 'compile: % ms', round((extract(epoch FROM clock_timestamp() - t0) * 1000 / 20)::numeric, 2);
  t0 := clock_timestamp();
  FOR i IN 1..20 LOOP SELECT count(*) INTO n FROM poco_scope_preview(21); END LOOP;
  RAISE NOTICE 'poco_scope_preview(21): % ms', round((extract(epoch FROM clock_timestamp() - t0) * 1000 / 20)::numeric, 2);
END \$\$;
SQL
} 2>&1 | sed 's/^NOTICE:  //' | tee "$OUT/scope_eval.txt"

# EXPLAIN output arrives as notices on stderr; capture them.
q -q 2>&1 >/dev/null <<SQL | sed 's/^NOTICE:  //' > "$OUT/scope_plans.txt"
DO \$\$
DECLARE r record; l text;
BEGIN
  FOR r IN SELECT table_name, select_sql FROM poco.scope_tables LOOP
    RAISE NOTICE '==== % ====', r.table_name;
    FOR l IN EXECUTE 'EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) ' || r.select_sql USING '21' LOOP
      RAISE NOTICE '%', l;
    END LOOP;
  END LOOP;
END \$\$;
SQL
echo "plans: $OUT/scope_plans.txt ($(grep -c 'Seq Scan' "$OUT/scope_plans.txt" || true) sequential scans)"
grep -B2 'Seq Scan' "$OUT/scope_plans.txt" | head -20 || true
