# Shared by the benchmark scripts (sourced, from the repository root): where the PostgreSQL
# binaries are, the non-root user the servers run as, the output folder, and psql shorthands
# for the platform (qp) and the learner (ql DB). Set before sourcing: BASE (the servers'
# folder), PPORT and LPORT (their ports on 127.0.0.1).
PG_MAJOR=${PG_MAJOR:-15}
BIN=/usr/lib/postgresql/$PG_MAJOR/bin
USER_=${POCO_TEST_USER:-poco}
OUT=bench/out
mkdir -p "$OUT" "$BASE"; chown "$USER_" "$BASE"
as_user() { runuser -u "$USER_" -- "$@"; }
P="-h 127.0.0.1 -p $PPORT -U postgres"
L="-h 127.0.0.1 -p $LPORT -U postgres"
qp() { "$BIN/psql" -X -v ON_ERROR_STOP=1 $P -d platform "$@"; }
ql() { local db=$1; shift; "$BIN/psql" -X -v ON_ERROR_STOP=1 $L -d "$db" "$@"; }
