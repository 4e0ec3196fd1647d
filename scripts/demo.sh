#!/usr/bin/env bash
# The demo: build and install poco_sync, start a platform and a learner server of its own
# (as the non-root user, on loopback ports 55432 and 55433, data under /var/tmp/poco_sync-demo),
# load the sample e-learning platform and its scope, store the learner as a target of one
# parent, preview what that parent's push would send, push it, and show what arrived.
# Idempotent: run it again and it reuses what is there. Stop it with: scripts/demo.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_MAJOR=${PG_MAJOR:-15}
USER_=${POCO_TEST_USER:-poco}
BASE=/var/tmp/poco_sync-demo
PLATFORM_PORT=55432
LEARNER_PORT=55433
BIN=/usr/lib/postgresql/$PG_MAJOR/bin
PG_CONFIG=$BIN/pg_config; [ -x "$PG_CONFIG" ] || PG_CONFIG=/usr/bin/pg_config

as_user() { runuser -u "$USER_" -- "$@"; }
psql_() { local port=$1 db=$2; shift 2; "$BIN/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$db" "$@"; }

if [ "${1:-}" = stop ]; then
  for s in platform learner; do
    [ -d "$BASE/$s" ] && as_user "$BIN/pg_ctl" stop -m fast -D "$BASE/$s" || true
  done
  exit 0
fi

bash scripts/setup.sh
echo "==> building and installing poco_sync (release)"
cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null

mkdir -p "$BASE" && chown "$USER_" "$BASE"
start() { # name port extra-conf
  local name=$1 port=$2 conf=$3 dir=$BASE/$1
  if [ ! -f "$dir/PG_VERSION" ]; then
    as_user "$BIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 >/dev/null
    printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\n%b" \
      "$port" "$BASE" "$conf" >> "$dir/postgresql.conf"
  fi
  if ! as_user "$BIN/pg_ctl" status -D "$dir" >/dev/null 2>&1; then
    as_user "$BIN/pg_ctl" start -w -D "$dir" -l "$BASE/$name.log" >/dev/null
  else # pick up a newly installed library
    as_user "$BIN/pg_ctl" restart -w -m fast -D "$dir" -l "$BASE/$name.log" >/dev/null
  fi
  echo "==> $name server on 127.0.0.1:$port (log: $BASE/$name.log)"
}

if [ ! -f "$BASE/poco.key" ]; then
  od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$BASE/poco.key"
  chown "$USER_" "$BASE/poco.key"; chmod 600 "$BASE/poco.key"
fi
start platform $PLATFORM_PORT "shared_preload_libraries = 'poco_sync'\npoco.database = 'platform'\npoco.key_file = '$BASE/poco.key'\npoco.allow_private_targets = on   # the learner is on loopback\n"
start learner $LEARNER_PORT ""

psql_ $PLATFORM_PORT postgres -qAtc "SELECT 1 FROM pg_database WHERE datname = 'platform'" | grep -q 1 \
  || psql_ $PLATFORM_PORT postgres -qc "CREATE DATABASE platform"
psql_ $LEARNER_PORT postgres -qAtc "SELECT 1 FROM pg_database WHERE datname = 'family'" | grep -q 1 \
  || psql_ $LEARNER_PORT postgres -qc "CREATE DATABASE family"
psql_ $LEARNER_PORT postgres -qc "DO \$\$ BEGIN CREATE ROLE family_owner LOGIN PASSWORD 'demo-Pa55'; EXCEPTION WHEN duplicate_object THEN NULL; END \$\$"
psql_ $LEARNER_PORT postgres -qc "ALTER DATABASE family OWNER TO family_owner"

echo "==> the sample e-learning platform (sample/) and its account scope"
# The version stays 0.1.0 while we develop: when the installed script changed since the last
# run, recreate the extension (its scope and targets go with it and are declared again below).
ext_sum=$(md5sum "$("$PG_CONFIG" --sharedir)/extension/poco_sync--0.1.0.sql" | cut -d' ' -f1)
if [ "$(cat "$BASE/extension.md5" 2>/dev/null)" != "$ext_sum" ]; then
  psql_ $PLATFORM_PORT platform -qc "DROP EXTENSION IF EXISTS poco_sync CASCADE" 2>/dev/null
fi
psql_ $PLATFORM_PORT platform -qc "CREATE EXTENSION IF NOT EXISTS poco_sync"
echo "$ext_sum" > "$BASE/extension.md5"
if [ "$(psql_ $PLATFORM_PORT platform -qAtc "SELECT count(*) FROM pg_namespace WHERE nspname = 'elearning'")" = 0 ]; then
  psql_ $PLATFORM_PORT platform -q -f sample/schema.sql
  psql_ $PLATFORM_PORT platform -q -v parents=${DEMO_PARENTS:-20} -f sample/data.sql
fi
[ "$(psql_ $PLATFORM_PORT platform -qAtc "SELECT count(*) FROM poco.scope")" != 0 ] \
  || psql_ $PLATFORM_PORT platform -q -o /dev/null -f sample/scope.sql
echo "==> a target for parent 21"
psql_ $PLATFORM_PORT platform -qAt -o /dev/null -c \
  "SELECT poco_add_target(21, 'postgresql://family_owner:demo-Pa55@127.0.0.1:$LEARNER_PORT/family?sslmode=disable', 'Parent 21''s laptop')"
echo "==> SELECT table_name, role, rows, path FROM poco_scope_preview(21);"
psql_ $PLATFORM_PORT platform -c "SELECT table_name, role, rows, path FROM poco_scope_preview(21)"
echo "==> SELECT * FROM poco_scope_check();  -- foreign keys the learner will not get, missing indexes"
psql_ $PLATFORM_PORT platform -c "SELECT * FROM poco_scope_check()"

echo; echo "==> SELECT target_id, parent_id, label, url_redacted FROM poco.targets;"
psql_ $PLATFORM_PORT platform -c "SELECT target_id, parent_id, label, url_redacted FROM poco.targets"
echo "==> SELECT * FROM poco_status(21);"
psql_ $PLATFORM_PORT platform -c "SELECT target_id, label, url_redacted, continuous, state FROM poco_status(21)"
echo "==> SELECT poco_check_target(target_id) FROM poco.targets;"
psql_ $PLATFORM_PORT platform -c "SELECT target_id, poco_check_target(target_id) FROM poco.targets"
# The worker connects once database "platform" exists (it retries every 2 s until then).
for _ in $(seq 1 50); do
  [ "$(psql_ $PLATFORM_PORT platform -qAtc "SELECT state FROM poco.worker")" = idle ] && break
  sleep 0.2
done
echo "==> SELECT pid, state, heartbeat_at FROM poco.worker;"
psql_ $PLATFORM_PORT platform -c "SELECT pid, state, heartbeat_at FROM poco.worker"
echo "==> SELECT poco_push(21);  then  SELECT poco_wait(job_id);   -- a full push of parent 21's family"
job=$(psql_ $PLATFORM_PORT platform -qAtc "SELECT poco_push(21)")
state=$(psql_ $PLATFORM_PORT platform -qAtc "SELECT poco_wait($job, '5 min')")
psql_ $PLATFORM_PORT platform -c "SELECT job_id, state, tables_done, rows_done, pg_size_pretty(bytes_done) AS bytes, finished_at - started_at AS took, error FROM poco.jobs WHERE job_id = $job"
[ "$state" = succeeded ] || { echo "the push did not succeed: $state" >&2; exit 1; }
echo "==> on the learner: what arrived (only parent 21's family and the content it uses)"
psql_ $LEARNER_PORT family -c "SELECT table_name, rows FROM poco_sync.tables ORDER BY table_name"
psql_ $LEARNER_PORT family -c "SELECT id, role, parent_id, display_name FROM elearning.users ORDER BY id"
psql_ $LEARNER_PORT family -c "SELECT parent_id, job_id, platform, pushed_at, tables, rows, pg_size_pretty(bytes) AS bytes FROM poco_sync.snapshot"
echo "==> SELECT poco_enable_sync(21, url);   -- continuous sync: a first snapshot, then every change"
target=$(psql_ $PLATFORM_PORT platform -qAtc \
  "SELECT poco_enable_sync(21, 'postgresql://family_owner:demo-Pa55@127.0.0.1:$LEARNER_PORT/family?sslmode=disable')")
for _ in $(seq 1 150); do
  [ "$(psql_ $PLATFORM_PORT platform -qAtc "SELECT state FROM poco_status(21) WHERE target_id = $target")" = streaming ] && break
  sleep 0.2
done
echo "==> a change on the platform: UPDATE elearning.users SET display_name = 'Parent 1 (renamed)' WHERE id = 21;"
psql_ $PLATFORM_PORT platform -qc "UPDATE elearning.users SET display_name = 'Parent 1 (renamed)' WHERE id = 21"
echo "==> SELECT poco_sync_wait($target);   -- true once the learner has it"
psql_ $PLATFORM_PORT platform -c "SELECT poco_sync_wait($target, '30 s')"
psql_ $LEARNER_PORT family -c "SELECT id, role, parent_id, display_name FROM elearning.users WHERE id = 21"
psql_ $PLATFORM_PORT platform -c "SELECT target_id, continuous, state, last_snapshot_at, last_applied_at, lag_changes, last_error FROM poco_status(21)"
echo "==> the audit log, poco.events"
psql_ $PLATFORM_PORT platform -c "SELECT at, kind, actor, message FROM poco.events ORDER BY id DESC LIMIT 5"
cat <<EOF2

The platform is at  psql -h 127.0.0.1 -p $PLATFORM_PORT -U postgres platform
the learner at      psql -h 127.0.0.1 -p $LEARNER_PORT -U postgres family
Stop both with:     bash scripts/demo.sh stop
Continuous sync of parent 21 stays on: change the family's rows on the platform and watch them
arrive (README, "Continuous sync"; figures in BENCHMARKS.md).
EOF2
