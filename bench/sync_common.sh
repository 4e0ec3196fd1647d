# Shared by bench/sync_latency.sh and bench/sync_catchup.sh (sourced, from the repository
# root): a platform and a learner server of their own under BASE, run by the non-root user,
# the sample platform loaded, continuous sync for families FIRST..LAST.
# Set before sourcing: BASE, PPORT (platform), LPORT (learner), PARENTS (sample families),
# MAX_CONNECTIONS, PLATFORM_CONF (extra postgresql.conf lines, \n-separated).
. bench/env.sh

server() { # name port extra-conf
  local d=$BASE/$1
  if [ -f "$d/data/PG_VERSION" ]; then
    as_user "$BIN/pg_ctl" status -D "$d/data" >/dev/null 2>&1 && as_user "$BIN/pg_ctl" stop -w -m fast -D "$d/data" >/dev/null
    rm -rf "$d"
  fi
  mkdir -p "$d"; chown "$USER_" "$d"
  as_user "$BIN/initdb" -D "$d/data" -U postgres --auth=trust -E UTF8 >/dev/null
  printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\nmax_connections = %s\nshared_buffers = '256MB'\n%b" "$2" "$d" "$MAX_CONNECTIONS" "$3" >> "$d/data/postgresql.conf"
  as_user "$BIN/pg_ctl" start -w -D "$d/data" -l "$d/server.log" >/dev/null
}

# Both servers, fresh, and the sample platform with its scope.
start_servers() {
  if [ ! -f "$BASE.key" ]; then head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$BASE.key"; fi
  chown "$USER_" "$BASE.key"; chmod 600 "$BASE.key"
  server platform "$PPORT" "shared_preload_libraries = 'poco_sync'\npoco.database = 'platform'\npoco.key_file = '$BASE.key'\npoco.allow_private_targets = on\nmax_worker_processes = 16\n$PLATFORM_CONF"
  server learner "$LPORT" ""
  "$BIN/psql" -X -q $P -d postgres -c "CREATE DATABASE platform"
  qp -qc "CREATE EXTENSION poco_sync" -f sample/schema.sql
  qp -q -v parents="$PARENTS" -f sample/data.sql
  qp -q -o /dev/null -f sample/scope.sql
}

# Continuous sync of families FIRST..LAST, each into its own database fam<N> on the learner
# (reached at port $1), and wait until every target streams.
enable_families() {
  local port=$1 f left=
  for f in $(seq "$FIRST" "$LAST"); do
    ql postgres -qc "CREATE DATABASE fam$f"
    qp -qAt -c "SELECT poco_enable_sync($f, 'postgresql://postgres:x@127.0.0.1:$port/fam$f?sslmode=disable')" >/dev/null
  done
  for _ in $(seq 600); do
    left=$(qp -qAt -c "SELECT count(*) FROM poco.target WHERE sync_state <> 'streaming'")
    [ "$left" = 0 ] && return 0
    sleep 0.5
  done
  echo "targets did not reach streaming: $left left" >&2
  exit 1
}

stop_servers() {
  [ "${KEEP:-0}" = 1 ] || for s in platform learner; do as_user "$BIN/pg_ctl" stop -w -m fast -D "$BASE/$s/data" >/dev/null; done
}
