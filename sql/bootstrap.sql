-- poco_sync catalog. Configuration (poco.target) and history (poco.events) are separate
-- tables, both kept by pg_dump (pg_extension_config_dump). Nothing here ever holds a
-- password in clear: poco.target.secret is AES-256-GCM ciphertext (see src/targets.rs).

CREATE SCHEMA IF NOT EXISTS poco;
COMMENT ON SCHEMA poco IS 'poco_sync catalog: targets, jobs, events';
REVOKE ALL ON SCHEMA poco FROM PUBLIC;

CREATE SEQUENCE poco.target_id_seq;
CREATE TABLE poco.target (
    id            bigint PRIMARY KEY DEFAULT nextval('poco.target_id_seq'),
    parent_id     text NOT NULL,
    label         text,
    host          text NOT NULL,
    port          integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    dbname        text NOT NULL,
    username      text NOT NULL,
    sslmode       text NOT NULL,
    params        jsonb NOT NULL DEFAULT '{}',
    url_redacted  text NOT NULL,
    secret        bytea,           -- 'P1' | key id | nonce | AES-256-GCM(password)
    key_id        text NOT NULL,   -- fingerprint of the key that sealed secret (not the key)
    continuous    boolean NOT NULL DEFAULT false,
    -- Continuous sync (docs/sync-design.md): off | snapshot | streaming | resnapshot | error
    sync_state    text NOT NULL DEFAULT 'off'
                  CHECK (sync_state IN ('off', 'snapshot', 'streaming', 'resnapshot', 'error')),
    -- streaming: every change visible in it is on the learner. snapshot / resnapshot / error:
    -- a snapshot taken before the coming full snapshot, so changes it may need are kept.
    sync_position pg_snapshot,
    sync_position_at timestamptz,  -- when sync_position last moved (backlog age)
    learner_position pg_snapshot,  -- the position last written to the learner's poco_sync.position
    last_snapshot_at timestamptz,  -- last full push that succeeded
    last_applied_at  timestamptz,  -- last change batch applied
    sync_lag      bigint NOT NULL DEFAULT 0,  -- captured changes after sync_position
    last_sync_error text,
    backups       integer NOT NULL DEFAULT 0 CHECK (backups BETWEEN 0 AND 100),  -- previous copies kept on the learner
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    name NOT NULL DEFAULT session_user,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE poco.target_id_seq OWNED BY poco.target.id;
-- One target per parent and destination: storing it again updates it (poco_add_target).
CREATE UNIQUE INDEX target_destination_idx ON poco.target (parent_id, host, port, dbname, username);
COMMENT ON TABLE poco.target IS 'Learner databases (internal; read poco.targets instead)';

CREATE SEQUENCE poco.events_id_seq;
CREATE TABLE poco.events (
    id         bigint PRIMARY KEY DEFAULT nextval('poco.events_id_seq'),
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind       text NOT NULL,
    parent_id  text,
    target_id  bigint,
    job_id     bigint,
    actor      name NOT NULL DEFAULT session_user,
    message    text NOT NULL,
    detail     jsonb NOT NULL DEFAULT '{}'
);
ALTER SEQUENCE poco.events_id_seq OWNED BY poco.events.id;
CREATE INDEX events_at_idx ON poco.events (at);
CREATE INDEX events_parent_idx ON poco.events (parent_id, at);
COMMENT ON TABLE poco.events IS 'Audit log: configuration changes, pushes, syncs and errors';

-- Account scope (API §1). Tables are stored as regclass: pg_dump writes them by name and a
-- restore resolves them again, and pg_upgrade keeps their OIDs. Every change is validated by
-- compiling the whole scope (src/scope.rs) before it commits.
CREATE TABLE poco.scope (
    rel         regclass PRIMARY KEY,
    role        text NOT NULL CHECK (role IN ('root', 'owned', 'reference')),
    predicate   text,    -- root: boolean SQL over the root's columns, $1 = parent id
    via         text,    -- owned: constraint or column picking the ownership path
    mode        text,    -- reference: 'referenced' or 'all'
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  name NOT NULL DEFAULT session_user,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((role = 'root') = (predicate IS NOT NULL)),
    CHECK ((role = 'reference') = (mode IN ('referenced', 'all'))),
    CHECK (role = 'owned' OR via IS NULL)
);
CREATE UNIQUE INDEX scope_one_root_idx ON poco.scope ((true)) WHERE role = 'root';
COMMENT ON TABLE poco.scope IS 'Account scope declarations: the root, owned and reference tables';

-- An excluded column is kept by number (it follows the column through renames: the event
-- trigger poco_schema_changed updates col) and by name (pg_dump and restore keep names, not
-- numbers). Both are excluded when they part (src/scope.rs), and the row stays when the column
-- is dropped, so a column added again under that name is excluded too.
CREATE TABLE poco.scope_exclusion (
    rel         regclass NOT NULL,
    attnum      smallint NOT NULL,
    col         name NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  name NOT NULL DEFAULT session_user,
    PRIMARY KEY (rel, attnum)
);
COMMENT ON TABLE poco.scope_exclusion IS 'Columns that never leave the platform';

SELECT pg_catalog.pg_extension_config_dump('poco.scope', '');

-- Per-parent authorization (src/authz.rs): a role mapped to parents acts for them only.
CREATE TABLE poco.parent_role (
    role        regrole NOT NULL,
    parent_id   text NOT NULL,   -- canonical form
    granted_at  timestamptz NOT NULL DEFAULT now(),
    granted_by  name NOT NULL DEFAULT session_user,
    PRIMARY KEY (role, parent_id)
);
COMMENT ON TABLE poco.parent_role IS 'Roles that act for one (or a few) parents only: poco_grant_parent()';
SELECT pg_catalog.pg_extension_config_dump('poco.parent_role', '');

-- Bumped (in the same transaction) by every change of the scope and every schema change of a
-- scoped table: the sync stream keeps the compiled scope while this stays the same.
CREATE TABLE poco.scope_generation (n bigint NOT NULL);
INSERT INTO poco.scope_generation VALUES (0);
SELECT pg_catalog.pg_extension_config_dump('poco.scope_exclusion', '');
SELECT pg_catalog.pg_extension_config_dump('poco.target', '');
SELECT pg_catalog.pg_extension_config_dump('poco.target_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('poco.events', '');
SELECT pg_catalog.pg_extension_config_dump('poco.events_id_seq', '');



-- Push jobs (API §2, §4). A row is queued by poco_push in the caller's transaction, so a
-- rolled-back caller queues nothing; the worker starts it after commit. Live progress of a
-- running job is in shared memory (poco.job_progress()); poco.jobs shows both.
CREATE SEQUENCE poco.job_id_seq;
CREATE TABLE poco.job (
    id               bigint PRIMARY KEY DEFAULT nextval('poco.job_id_seq'),
    kind             text NOT NULL DEFAULT 'push' CHECK (kind IN ('push', 'restore')),
    parent_id        text NOT NULL,
    target_id        bigint REFERENCES poco.target (id) ON DELETE SET NULL,
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    requested_by     name NOT NULL DEFAULT session_user,
    requested_at     timestamptz NOT NULL DEFAULT now(),
    backup           boolean NOT NULL DEFAULT false,
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 1 CHECK (max_attempts >= 1),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    tables_total     integer,
    tables_done      integer NOT NULL DEFAULT 0,
    rows_done        bigint NOT NULL DEFAULT 0,
    bytes_done       bigint NOT NULL DEFAULT 0,
    current_table    text,
    error            text,
    error_sqlstate   text,
    backup_schema    text,
    detail           jsonb NOT NULL DEFAULT '{}'
);
ALTER SEQUENCE poco.job_id_seq OWNED BY poco.job.id;
CREATE INDEX job_queue_idx ON poco.job (next_attempt_at, id) WHERE state IN ('queued', 'running');
CREATE INDEX job_target_idx ON poco.job (target_id, id);
COMMENT ON TABLE poco.job IS 'Push jobs (internal; read poco.jobs instead)';
SELECT pg_catalog.pg_extension_config_dump('poco.job', '');
SELECT pg_catalog.pg_extension_config_dump('poco.job_id_seq', '');

-- Change capture for continuous sync (docs/sync-design.md). One row per row change of a scoped
-- table while any target syncs: the writing transaction, the table, the operation, the row
-- before (update, delete) and after (insert, update). Read by snapshot visibility of txid,
-- in no particular order (a batch is the set of keys its changes touched).
-- Kept cheap for the platform's writes (bench/sync_latency.sh): no identity column (a
-- sequence call per row cost ~9 % of a one-row insert transaction) and a BRIN index on the
-- transaction id as a bigint (a B-tree on xid8 cost ~6 % more); rows arrive in txid order,
-- which is what BRIN wants, and the stream's range reads only need the recent block ranges.
CREATE TABLE poco.change (
    txid  bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    rel   oid NOT NULL,
    op    "char" NOT NULL CHECK (op IN ('I', 'U', 'D', 'T')),
    -- The row before and after in its composite text form (record_out, the table's own
    -- column order: of the partition, for a partitioned table). Not row_to_json: that calls
    -- a type owner's cast to json, which would run as poco_sync's owner (src/stream/capture.rs
    -- parses the text).
    old   text,
    new   text
);
CREATE INDEX change_txid_idx ON poco.change USING brin (txid) WITH (pages_per_range = 4);
COMMENT ON TABLE poco.change IS 'Captured row changes of scoped tables, pending delivery to continuous targets';

-- How poco_sync handles a column's type without running anyone's code (issue #15, point 6):
--  plain: the type is built in all the way down (through domains, arrays, composites and
--         ranges), so to_jsonb turns it into JSON without looking for a cast to json (which a
--         type's owner may create); other values go as their text output;
--  safe:  the type to read an image value as without running a domain's CHECK (which may
--         call its owner's function): domains become their base type, arrays of domains
--         arrays of the base, composites and ranges that are not plain become text;
--  json:  the base type is json or jsonb (an image value is JSON, not a string).
CREATE FUNCTION poco.type_profile(typ oid, typmod integer, OUT plain boolean, OUT safe text, OUT json boolean)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  base oid := typ;
  btm integer := typmod;
  ty pg_type;
  depth integer := 0;
  elem record;
  arr oid;
BEGIN
  LOOP
    SELECT * INTO ty FROM pg_type t WHERE t.oid = base;
    EXIT WHEN NOT FOUND OR ty.typtype <> 'd' OR depth > 32;
    base := ty.typbasetype;
    btm := ty.typtypmod;
    depth := depth + 1;
  END LOOP;
  json := base IN ('json'::regtype, 'jsonb'::regtype);
  WITH RECURSIVE tree(oid, depth) AS (
      SELECT typ, 0
    UNION ALL
      SELECT n.dep, tree.depth + 1 FROM tree JOIN pg_type y ON y.oid = tree.oid
      CROSS JOIN LATERAL (
          SELECT y.typbasetype WHERE y.typtype = 'd'
          UNION ALL SELECT y.typelem WHERE y.typelem <> 0 AND y.typsubscript = 'array_subscript_handler'::regproc
          UNION ALL SELECT a.atttypid FROM pg_attribute a
                     WHERE y.typtype = 'c' AND a.attrelid = y.typrelid AND a.attnum > 0 AND NOT a.attisdropped
          UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE y.typtype = 'r' AND r.rngtypid = y.oid) n(dep)
      WHERE tree.depth < 32)
  -- Domains do not count (to_jsonb looks through them); every other type must be built in.
  SELECT bool_and(tree.oid < 16384 OR y.typtype = 'd') INTO plain
    FROM tree JOIN pg_type y ON y.oid = tree.oid;
  IF ty.typelem <> 0 AND ty.typsubscript = 'array_subscript_handler'::regproc THEN
    SELECT * INTO elem FROM poco.type_profile(ty.typelem, btm) p;
    arr := (SELECT y.typarray FROM pg_type y WHERE y.oid = pg_catalog.to_regtype(elem.safe));
    safe := CASE WHEN elem.safe = 'pg_catalog.text' AND ty.typelem <> 'text'::regtype THEN 'pg_catalog.text'
                 WHEN arr IS NULL OR arr = 0 THEN 'pg_catalog.text'
                 ELSE format_type(arr, btm) END;
  ELSIF ty.typtype IN ('c', 'r', 'm') AND NOT plain THEN
    safe := 'pg_catalog.text';
  ELSE
    safe := format_type(base, btm);
  END IF;
END $$;
