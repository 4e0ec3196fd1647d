-- Public interface (API.md). Functions live in pg_catalog, as pg_cron's do, so they are
-- callable without schema qualification; they are SECURITY DEFINER with a fixed search_path
-- and EXECUTE is revoked from PUBLIC: a DBA grants them to the application's role.
--
-- parent_id takes the type of the scope root's key: the anyelement overloads take integer,
-- bigint, uuid...; the text overloads take untyped literals ('a-uuid-or-name').

-- What anyone allowed to look may see of a target: never the secret; a role granted a parent
-- (poco_grant_parent) sees that parent's targets only.
CREATE VIEW poco.targets WITH (security_barrier) AS
SELECT t.id AS target_id, t.parent_id, t.label, t.url_redacted, t.host, t.port, t.dbname,
       t.username, t.sslmode, t.params, t.secret IS NOT NULL AS has_password, t.key_id,
       t.continuous, t.backups, t.created_at, t.created_by, t.updated_at
  FROM poco.target t
 WHERE poco.may_see(t.parent_id);
COMMENT ON VIEW poco.targets IS 'One row per learner target; credentials are never shown';

-- The audit log, likewise: a role granted a parent reads that parent's events only (the
-- functions that write it run as its owner, which row-level security lets through).
ALTER TABLE poco.events ENABLE ROW LEVEL SECURITY;
CREATE POLICY events_of_granted_parents ON poco.events FOR SELECT USING (poco.may_see(parent_id));

CREATE VIEW poco.worker AS SELECT * FROM poco.worker_status();
COMMENT ON VIEW poco.worker IS 'The poco_sync background worker and its heartbeat';

CREATE FUNCTION pg_catalog.poco_add_target(parent_id anyelement, url text, label text DEFAULT NULL)
RETURNS bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.add_target($1::text, $2, NULL::jsonb, $3) $$;

CREATE FUNCTION pg_catalog.poco_add_target(parent_id text, url text, label text DEFAULT NULL)
RETURNS bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.add_target($1, $2, NULL::jsonb, $3) $$;

CREATE FUNCTION pg_catalog.poco_add_target(parent_id anyelement, url jsonb, label text DEFAULT NULL)
RETURNS bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.add_target($1::text, NULL::text, $2, $3) $$;

CREATE FUNCTION pg_catalog.poco_add_target(parent_id text, url jsonb, label text DEFAULT NULL)
RETURNS bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.add_target($1, NULL::text, $2, $3) $$;

CREATE FUNCTION pg_catalog.poco_remove_target(target_id bigint)
RETURNS void LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.remove_target($1) $$;

CREATE FUNCTION pg_catalog.poco_check_target(target_id bigint)
RETURNS text LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.check_target($1) $$;

-- Superuser only (not granted by poco_grant_usage): re-encrypt all targets under the
-- current poco.key_file; the argument names the file of the key they were stored with.
CREATE FUNCTION pg_catalog.poco_rotate_key(old_key_file text)
RETURNS bigint LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.rotate_key($1) $$;

CREATE FUNCTION poco.status_of(parent_id text)
RETURNS TABLE(target_id bigint, label text, url_redacted text, continuous boolean, state text,
              last_snapshot_at timestamptz, last_applied_at timestamptz, lag_changes bigint,
              last_error text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
  SELECT t.id, t.label, t.url_redacted, t.continuous,
         CASE WHEN t.continuous THEN t.sync_state ELSE 'idle' END,
         t.last_snapshot_at, t.last_applied_at,
         CASE WHEN t.continuous THEN t.sync_lag ELSE 0 END::bigint, t.last_sync_error
    FROM poco.target t WHERE t.parent_id = (SELECT poco.authorized_parent($1)) ORDER BY t.id
$$;

CREATE FUNCTION pg_catalog.poco_status(parent_id anyelement)
RETURNS TABLE(target_id bigint, label text, url_redacted text, continuous boolean, state text,
              last_snapshot_at timestamptz, last_applied_at timestamptz, lag_changes bigint,
              last_error text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM poco.status_of($1::text) $$;

CREATE FUNCTION pg_catalog.poco_status(parent_id text)
RETURNS TABLE(target_id bigint, label text, url_redacted text, continuous boolean, state text,
              last_snapshot_at timestamptz, last_applied_at timestamptz, lag_changes bigint,
              last_error text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM poco.status_of($1) $$;

-- ---- Push jobs (API §2, §4). poco_push queues in the caller's transaction; the worker
-- starts the jobs when it commits.
CREATE FUNCTION pg_catalog.poco_push(parent_id anyelement)
RETURNS SETOF bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.push($1::text, NULL::bigint) $$;

CREATE FUNCTION pg_catalog.poco_push(parent_id text)
RETURNS SETOF bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.push($1, NULL::bigint) $$;

CREATE FUNCTION pg_catalog.poco_push(parent_id anyelement, target_id bigint)
RETURNS bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.push($1::text, $2) $$;

CREATE FUNCTION pg_catalog.poco_push(parent_id text, target_id bigint)
RETURNS bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.push($1, $2) $$;

CREATE FUNCTION pg_catalog.poco_wait(job_id bigint, timeout interval DEFAULT '5 min')
RETURNS text LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.wait($1, extract(epoch FROM $2)::float8) $$;

CREATE FUNCTION pg_catalog.poco_cancel(job_id bigint)
RETURNS boolean LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.cancel($1) $$;

-- Backups on the learner: before each push, keep the previous copy in a schema
-- poco_backup_<time>_<job> there (the last `keep`); poco_restore brings one back.
CREATE FUNCTION pg_catalog.poco_set_backups(target_id bigint, keep integer)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  PERFORM poco.authorize_target(target_id);
  IF keep IS NULL OR keep < 0 OR keep > 100 THEN
    RAISE EXCEPTION 'keep must be between 0 and 100, not %', coalesce(keep::text, 'NULL')
      USING ERRCODE = '22023', HINT = '0 keeps no backup; N keeps the last N copies on the learner.';
  END IF;
  UPDATE poco.target t SET backups = keep, updated_at = now() WHERE t.id = target_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'target % does not exist', target_id USING ERRCODE = '42704', HINT = 'poco.targets lists the targets.';
  END IF;
  INSERT INTO poco.events (kind, parent_id, target_id, message, detail)
  SELECT 'target_updated', t.parent_id, t.id, format('target %s keeps %s backup(s)', t.id, keep), jsonb_build_object('backups', keep)
    FROM poco.target t WHERE t.id = target_id;
END $$;

CREATE FUNCTION pg_catalog.poco_restore(target_id bigint, backup text DEFAULT NULL)
RETURNS bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.restore($1, $2) $$;

CREATE VIEW poco.jobs WITH (security_barrier) AS
SELECT j.id AS job_id, j.kind, j.parent_id, j.target_id, j.state,
       COALESCE(p.tables_total, j.tables_total) AS tables_total,
       COALESCE(p.tables_done, j.tables_done) AS tables_done,
       COALESCE(p.rows_done, j.rows_done) AS rows_done,
       COALESCE(p.bytes_done, j.bytes_done) AS bytes_done,
       COALESCE(p.current_table, j.current_table) AS current_table,
       j.started_at, j.finished_at, j.error, j.error_sqlstate, j.attempts, j.max_attempts,
       j.next_attempt_at, j.requested_by, j.requested_at, p.pid, COALESCE(p.cancelling, false) AS cancelling,
       j.backup_schema, j.detail
  FROM poco.job j LEFT JOIN poco.job_progress() p ON p.job_id = j.id
 WHERE poco.may_see(j.parent_id);
COMMENT ON VIEW poco.jobs IS 'One row per push job, with the live progress of running ones';

-- ---- Account scope (API §1). Declaring the scope is for the DBA (not granted by
-- poco_grant_usage); previewing it is for applications too.
CREATE FUNCTION pg_catalog.poco_scope_root(tbl regclass, predicate text)
RETURNS void LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.scope_root($1::oid, $2) $$;

CREATE FUNCTION pg_catalog.poco_scope_table(tbl regclass, via text DEFAULT NULL)
RETURNS void LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.scope_table($1::oid, $2) $$;

CREATE FUNCTION pg_catalog.poco_scope_reference(tbl regclass, mode text DEFAULT 'referenced')
RETURNS void LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.scope_reference($1::oid, $2) $$;

CREATE FUNCTION pg_catalog.poco_scope_exclude_column(tbl regclass, col name)
RETURNS void LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.scope_exclude_column($1::oid, $2::text) $$;

CREATE FUNCTION pg_catalog.poco_scope_include_column(tbl regclass, col name)
RETURNS boolean LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.scope_include_column($1::oid, $2::text) $$;

CREATE FUNCTION pg_catalog.poco_scope_remove(tbl regclass)
RETURNS boolean LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.scope_remove($1::oid) $$;

CREATE FUNCTION pg_catalog.poco_scope_clear()
RETURNS bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.scope_clear() $$;

CREATE FUNCTION pg_catalog.poco_scope_preview(parent_id anyelement)
RETURNS TABLE(table_name text, role text, rows bigint, path text, foreign_keys_sent text[],
              foreign_keys_left_out text[], excluded_columns text[], warnings text[])
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM poco.scope_preview($1::text) $$;

CREATE FUNCTION pg_catalog.poco_scope_preview(parent_id text)
RETURNS TABLE(table_name text, role text, rows bigint, path text, foreign_keys_sent text[],
              foreign_keys_left_out text[], excluded_columns text[], warnings text[])
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM poco.scope_preview($1) $$;

CREATE FUNCTION pg_catalog.poco_scope_check()
RETURNS TABLE(table_name text, severity text, message text)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM poco.scope_check() $$;

CREATE FUNCTION pg_catalog.poco_scope_owners(tbl regclass, row_data jsonb, parent_ids text[] DEFAULT NULL)
RETURNS SETOF text LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM poco.scope_owners($1::oid, $2, $3) $$;

-- A dropped table leaves the scope with it (logged); a table that needed it for its path then
-- fails to resolve with an error naming it, at the next scope change, preview or push.
CREATE FUNCTION poco.forget_dropped_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE o record; r text;
BEGIN
  IF to_regclass('poco.scope') IS NULL THEN RETURN; END IF;   -- DROP EXTENSION itself
  FOR o IN SELECT objid, object_identity FROM pg_event_trigger_dropped_objects()
            WHERE object_type = 'table' AND objsubid = 0 LOOP
    DELETE FROM poco.scope_exclusion WHERE rel::oid = o.objid;
    DELETE FROM poco.scope WHERE rel::oid = o.objid RETURNING role INTO r;
    IF r IS NOT NULL THEN
      INSERT INTO poco.events (kind, message, detail)
      VALUES ('scope_changed', format('scope: %s (%s) was dropped; its declaration is removed', o.object_identity, r),
              jsonb_build_object('table', o.object_identity, 'removed', r, 'reason', 'dropped'));
      UPDATE poco.scope_generation SET n = n + 1;
      IF to_regprocedure('poco.resnapshot_all(text)') IS NOT NULL THEN
        PERFORM poco.resnapshot_all(format('%s left the scope (dropped)', o.object_identity));
      END IF;
    END IF;
  END LOOP;
END $$;
CREATE EVENT TRIGGER poco_forget_dropped_tables ON sql_drop
  EXECUTE FUNCTION poco.forget_dropped_tables();

-- The compiled scope, one row per table (DBAs: EXPLAIN the select_sql with a parent id).
CREATE VIEW poco.scope_tables AS SELECT * FROM poco.scope_queries();
COMMENT ON VIEW poco.scope_tables IS 'The compiled account scope: path and queries of each scoped table';

-- ---- Continuous sync (API §2; docs/sync-design.md) ----

-- A row's composite text form as the stream reads it back: record_out under fixed output
-- settings (ISO dates, postgres intervals, exact floats, hex bytea, UTC), whatever the writing
-- session's (src/sync.rs; issue #24).
CREATE FUNCTION poco.record_image(record) RETURNS text
LANGUAGE c STRICT STABLE PARALLEL SAFE
AS 'MODULE_PATHNAME', 'poco_record_image';
REVOKE ALL ON FUNCTION poco.record_image(record) FROM PUBLIC;

-- The capture trigger: one poco.change row per row change (SECURITY DEFINER: the roles that
-- write the platform's tables need no right on poco). No SET search_path on it: that clause
-- costs a GUC save and restore on every row (~6 % of a one-row insert transaction); instead
-- every name and operator in the body is schema-qualified, so a caller's search_path cannot
-- substitute anything.
CREATE FUNCTION poco.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $$
BEGIN
  IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
    INSERT INTO poco.change (rel, op, new) VALUES (TG_RELID, 'I', poco.record_image(NEW));
  ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
    INSERT INTO poco.change (rel, op, old, new) VALUES (TG_RELID, 'U', poco.record_image(OLD), poco.record_image(NEW));
  ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
    INSERT INTO poco.change (rel, op, old) VALUES (TG_RELID, 'D', poco.record_image(OLD));
  ELSE
    INSERT INTO poco.change (rel, op) VALUES (TG_RELID, 'T');
  END IF;
  RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION poco.capture() FROM PUBLIC;

-- Every relation whose changes continuous sync captures: the scoped tables, the undeclared
-- tables on their ownership paths, and all their partitions at any depth.
CREATE FUNCTION poco.captured_relations() RETURNS regclass[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
  -- (pg_partition_tree lists nothing for a table that is not partitioned.)
  SELECT coalesce(array_agg(DISTINCT r), '{}') FROM (
      SELECT t::regclass FROM unnest(poco.capture_relations()) t
      UNION SELECT p.relid FROM unnest(poco.capture_relations()) t, LATERAL pg_partition_tree(t::regclass) p) x(r)
$$;

-- Capture triggers on exactly the captured relations while any target syncs, on none
-- otherwise: the row trigger on each captured table (PostgreSQL clones it onto partitions,
-- including those created or attached later), the TRUNCATE and wake-up statement triggers
-- on every partition too (statement triggers are not cloned, and a TRUNCATE or a write may
-- name one partition). All ENABLE ALWAYS: they fire under session_replication_role = replica
-- as well (pg_restore --disable-triggers, logical replication's apply), and one found
-- disabled is enabled again. Triggers of ours under another name (renamed) are dropped.
-- Returns the number of tables captured.
CREATE FUNCTION poco.refresh_capture() RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  top regclass[] := '{}';
  every regclass[] := '{}';
  ours oid[] := ARRAY['poco.capture()'::regprocedure, 'poco.capture_wake()'::regprocedure]::oid[];
  r record;
BEGIN
  -- Our own ALTER TABLE ... ENABLE ALWAYS TRIGGER is not a schema change (poco.schema_changed).
  PERFORM set_config('poco_sync.refreshing', 'on', true);
  IF EXISTS (SELECT 1 FROM poco.target WHERE continuous) THEN
    top := poco.capture_relations()::regclass[];
    every := poco.captured_relations();
  END IF;
  FOR r IN SELECT tg.tgrelid::regclass AS rel, tg.tgname FROM pg_trigger tg
            WHERE tg.tgfoid = ANY (ours) AND tg.tgparentid = 0
              AND (tg.tgname NOT IN ('poco_capture', 'poco_capture_truncate', 'poco_capture_wake')
                   OR NOT (tg.tgrelid::regclass = ANY (CASE WHEN tg.tgname = 'poco_capture' THEN top ELSE every END))) LOOP
    EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, r.rel);
  END LOOP;
  FOR r IN SELECT w AS rel FROM unnest(top) w
            WHERE NOT EXISTS (SELECT 1 FROM pg_trigger tg WHERE tg.tgrelid = w AND tg.tgname = 'poco_capture') LOOP
    EXECUTE format('CREATE TRIGGER poco_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION poco.capture()', r.rel);
  END LOOP;
  FOR r IN SELECT w AS rel FROM unnest(every) w LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_trigger tg WHERE tg.tgrelid = r.rel AND tg.tgname = 'poco_capture_truncate') THEN
      EXECUTE format('CREATE TRIGGER poco_capture_truncate AFTER TRUNCATE ON %s '
                     'FOR EACH STATEMENT EXECUTE FUNCTION poco.capture()', r.rel);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger tg WHERE tg.tgrelid = r.rel AND tg.tgname = 'poco_capture_wake') THEN
      EXECUTE format('CREATE TRIGGER poco_capture_wake AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s '
                     'FOR EACH STATEMENT EXECUTE FUNCTION poco.capture_wake()', r.rel);
    END IF;
  END LOOP;
  -- ENABLE ALWAYS: on the table for the row trigger (it recurses to the clones), on each
  -- relation for the statement triggers.
  FOR r IN SELECT DISTINCT t AS rel FROM unnest(top) t
             JOIN pg_trigger tg ON tg.tgname = 'poco_capture' AND tg.tgenabled <> 'A'
              AND (tg.tgrelid = t OR tg.tgrelid IN (SELECT p.relid FROM pg_partition_tree(t) p)) LOOP
    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER poco_capture', r.rel);
  END LOOP;
  FOR r IN SELECT tg.tgrelid::regclass AS rel, tg.tgname FROM pg_trigger tg
            WHERE tg.tgfoid = ANY (ours) AND tg.tgparentid = 0 AND tg.tgname <> 'poco_capture' AND tg.tgenabled <> 'A' LOOP
    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', r.rel, r.tgname);
  END LOOP;
  IF cardinality(top) = 0 THEN
    TRUNCATE poco.change;   -- nobody left to deliver to
  END IF;
  PERFORM set_config('poco_sync.refreshing', 'off', true);
  RETURN cardinality(top);
END $$;

-- What is wrong with the capture of the captured relations (NULL: nothing): a trigger
-- missing, or not ENABLE ALWAYS. The stream checks it every second (src/stream/positions.rs),
-- so a capture lost in a way no event trigger sees is repaired and re-snapshotted.
CREATE FUNCTION poco.capture_fault() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
  SELECT string_agg(format('%s %s on %s', w.tgname, CASE WHEN tg.oid IS NULL THEN 'missing' ELSE 'disabled' END, r), ', ')
    FROM unnest(poco.captured_relations()) r
   CROSS JOIN unnest(ARRAY['poco_capture', 'poco_capture_truncate', 'poco_capture_wake']) w(tgname)
    LEFT JOIN pg_trigger tg ON tg.tgrelid = r AND tg.tgname = w.tgname
   WHERE (tg.oid IS NULL OR tg.tgenabled <> 'A')
     AND EXISTS (SELECT 1 FROM poco.target WHERE continuous)
$$;

-- Does position `pos` include every transaction that snapshot `s` sees?
CREATE FUNCTION poco.snapshot_covers(pos pg_snapshot, s pg_snapshot) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
  SELECT pos IS NOT NULL AND pg_snapshot_xmax(pos) >= pg_snapshot_xmax(s)
     AND NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(pos) x
                      WHERE x < pg_snapshot_xmax(s) AND pg_visible_in_snapshot(x, s))
$$;

CREATE FUNCTION poco.enable_sync(parent_id text, target_id bigint) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  t poco.target;
BEGIN
  SELECT * INTO t FROM poco.target WHERE id = target_id FOR UPDATE;
  IF t.continuous AND t.sync_state IN ('snapshot', 'resnapshot', 'streaming') THEN
    RETURN t.id;   -- already on: nothing to start again
  END IF;
  PERFORM poco.check_followable();
  -- The position holds, until the snapshot job records its own, a snapshot taken before it:
  -- changes are pruned below the oldest position, and the job's snapshot needs those after it.
  UPDATE poco.target SET continuous = true, sync_state = 'snapshot', sync_position = pg_current_snapshot(),
         sync_position_at = now(), sync_lag = 0, last_sync_error = NULL, updated_at = now()
   WHERE id = t.id;
  -- Triggers first, then the snapshot job: the job's snapshot is taken after this commits, so
  -- every change after it is captured.
  PERFORM poco.refresh_capture();
  PERFORM poco_push(parent_id, t.id);
  INSERT INTO poco.events (kind, parent_id, target_id, message)
  VALUES ('sync_enabled', t.parent_id, t.id, format('continuous sync enabled for target %s', t.id));
  RETURN t.id;
END $$;

-- Start a target over with a full snapshot (the stream calls it: TRUNCATE, a moved subtree,
-- a refused batch, a backlog past its limit, a schema or scope change, a failed snapshot
-- retried). Its backlog is released: the position becomes a snapshot taken now, before the job's.
CREATE FUNCTION poco.resnapshot(target_id bigint, why text, delay interval DEFAULT '0') RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  t poco.target;
BEGIN
  SELECT * INTO t FROM poco.target WHERE id = target_id AND continuous FOR UPDATE;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = t.id AND j.state IN ('queued', 'running')) THEN
    -- The position becomes a floor below the coming job's snapshot: changes are pruned below
    -- the oldest position, and that job's snapshot needs those after it.
    UPDATE poco.target SET sync_state = 'resnapshot', sync_position = pg_current_snapshot(),
           sync_position_at = now(), last_sync_error = left('re-snapshot: ' || why, 4000)
     WHERE id = t.id;
    PERFORM poco_push(t.parent_id, t.id);
    -- A learner that refuses batch after batch is not pushed again at once every time.
    IF delay > '0' THEN
      UPDATE poco.job j SET next_attempt_at = now() + delay WHERE j.target_id = t.id AND j.state = 'queued';
    END IF;
  ELSE
    -- A job is on its way: the position stays (it is the floor below that job's snapshot;
    -- moving it past a running job's snapshot would let the changes between be pruned).
    UPDATE poco.target SET sync_state = 'resnapshot', last_sync_error = left('re-snapshot: ' || why, 4000)
     WHERE id = t.id;
    IF NOT EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = t.id AND j.state = 'queued') THEN
      -- Only a running one, whose snapshot may predate this reason (a schema change made
      -- while it copied): another follows it.
      PERFORM poco_push(t.parent_id, t.id);
    ELSIF delay = '0' THEN
      -- A snapshot held back (after refusals) is wanted now for another reason.
      UPDATE poco.job j SET next_attempt_at = least(j.next_attempt_at, now())
       WHERE j.target_id = t.id AND j.state = 'queued' AND j.attempts = 0;
    END IF;
  END IF;
  INSERT INTO poco.events (kind, parent_id, target_id, message)
  VALUES ('sync_resnapshot', t.parent_id, t.id, format('target %s is re-snapshotted: %s', t.id, why));
  RETURN true;
END $$;

-- Every continuous target starts over (a schema change of a scoped table, a scope change).
CREATE FUNCTION poco.resnapshot_all(why text) RETURNS integer
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$ SELECT count(*)::integer FROM poco.target t WHERE t.continuous AND poco.resnapshot(t.id, why) $$;

-- A schema change of a scoped table, or of a type one of its columns uses, reaches the
-- learners through a new snapshot (the learner's copy is recreated with the new schema). So
-- does one of another captured relation (a path table, a partition: paths and partitions may
-- have changed), and the capture triggers are refreshed (an ALTER TABLE ... DISABLE TRIGGER
-- of ours is undone at once).
CREATE FUNCTION poco.schema_changed() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  hit text;
  continuous boolean;
BEGIN
  IF to_regclass('poco.target') IS NULL OR NOT EXISTS (SELECT 1 FROM poco.scope)
     OR current_setting('poco_sync.refreshing', true) = 'on' THEN
    RETURN;
  END IF;
  continuous := EXISTS (SELECT 1 FROM poco.target t WHERE t.continuous);
  WITH scoped AS (SELECT rel::oid AS oid FROM poco.scope
                  UNION SELECT unnest(poco.captured_relations())::oid WHERE continuous),
       used AS (SELECT a.atttypid AS oid FROM pg_attribute a JOIN scoped s ON a.attrelid = s.oid
                 WHERE a.attnum > 0 AND NOT a.attisdropped),
       types AS (SELECT u.oid FROM used u
                 UNION SELECT ty.typelem FROM used u JOIN pg_type ty ON ty.oid = u.oid WHERE ty.typelem <> 0
                 UNION SELECT ty.typbasetype FROM used u JOIN pg_type ty ON ty.oid = u.oid WHERE ty.typbasetype <> 0)
  SELECT string_agg(DISTINCT d.object_identity, ', ') INTO hit
    FROM pg_event_trigger_ddl_commands() d
   WHERE (d.classid = 'pg_class'::regclass AND d.objid IN (SELECT oid FROM scoped))
      OR (d.classid = 'pg_type'::regclass AND d.objid IN (SELECT oid FROM types));
  -- An excluded column renamed: its exclusion follows it (by number) and takes its new name.
  UPDATE poco.scope_exclusion e SET col = a.attname
    FROM pg_attribute a
   WHERE a.attrelid = e.rel AND a.attnum = e.attnum AND NOT a.attisdropped AND a.attname <> e.col
     AND e.rel::oid IN (SELECT d.objid FROM pg_event_trigger_ddl_commands() d WHERE d.classid = 'pg_class'::regclass);
  IF hit IS NOT NULL THEN
    UPDATE poco.scope_generation SET n = n + 1;
    IF continuous THEN
      PERFORM poco.refresh_capture();
      PERFORM poco.resnapshot_all(format('the schema of %s changed', hit));
    END IF;
  END IF;
END $$;
CREATE EVENT TRIGGER poco_schema_changed ON ddl_command_end
  WHEN TAG IN ('ALTER TABLE', 'ALTER TYPE', 'ALTER DOMAIN')
  EXECUTE FUNCTION poco.schema_changed();

-- A capture trigger dropped or renamed, or a partition created under a captured table: the
-- capture is put right at the end of that very command, so no write of the transaction goes
-- uncaptured.
CREATE FUNCTION poco.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF to_regclass('poco.target') IS NULL OR current_setting('poco_sync.refreshing', true) = 'on'
     OR NOT EXISTS (SELECT 1 FROM poco.target WHERE continuous) THEN
    RETURN;
  END IF;
  IF poco.capture_fault() IS NOT NULL THEN
    PERFORM poco.refresh_capture();
  END IF;
END $$;
CREATE EVENT TRIGGER poco_capture_ddl ON ddl_command_end
  WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'DROP TRIGGER', 'ALTER TRIGGER')
  EXECUTE FUNCTION poco.capture_ddl();

-- Event triggers of poco_sync fire whatever session_replication_role says.
ALTER EVENT TRIGGER poco_schema_changed ENABLE ALWAYS;
ALTER EVENT TRIGGER poco_capture_ddl ENABLE ALWAYS;
ALTER EVENT TRIGGER poco_forget_dropped_tables ENABLE ALWAYS;

CREATE FUNCTION pg_catalog.poco_enable_sync(parent_id anyelement, url text)
RETURNS bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.enable_sync(poco.authorized_parent($1::text), poco_add_target($1::text, $2)) $$;
CREATE FUNCTION pg_catalog.poco_enable_sync(parent_id text, url text)
RETURNS bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.enable_sync(poco.authorized_parent($1), poco_add_target($1, $2)) $$;
CREATE FUNCTION pg_catalog.poco_enable_sync(parent_id anyelement, url jsonb)
RETURNS bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.enable_sync(poco.authorized_parent($1::text), poco_add_target($1::text, $2)) $$;
CREATE FUNCTION pg_catalog.poco_enable_sync(parent_id text, url jsonb)
RETURNS bigint LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.enable_sync(poco.authorized_parent($1), poco_add_target($1, $2)) $$;
-- The same for a target already stored, without its credentials again (API §2).
CREATE FUNCTION pg_catalog.poco_enable_sync(target_id bigint)
RETURNS bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  p text;
BEGIN
  PERFORM poco.authorize_target(target_id);
  SELECT t.parent_id INTO p FROM poco.target t WHERE t.id = target_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'target % does not exist', target_id USING ERRCODE = '42704', HINT = 'poco.targets lists the targets.';
  END IF;
  RETURN poco.enable_sync(poco.authorized_parent(p), target_id);
END $$;

CREATE FUNCTION poco.disable_sync(parent_id text) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  n integer;
BEGIN
  WITH d AS (
    UPDATE poco.target SET continuous = false, sync_state = 'off', sync_position = NULL,
           sync_lag = 0, updated_at = now()
     WHERE poco.target.parent_id = disable_sync.parent_id AND continuous RETURNING id)
  SELECT count(*) INTO n FROM d;
  IF n > 0 THEN
    PERFORM poco.refresh_capture();
    INSERT INTO poco.events (kind, parent_id, message)
    VALUES ('sync_disabled', disable_sync.parent_id, format('continuous sync disabled (%s targets)', n));
  END IF;
  RETURN n;
END $$;

CREATE FUNCTION pg_catalog.poco_disable_sync(parent_id anyelement)
RETURNS void LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.disable_sync(poco.authorized_parent($1::text)); $$;
CREATE FUNCTION pg_catalog.poco_disable_sync(parent_id text)
RETURNS void LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.disable_sync(poco.authorized_parent($1)); $$;

CREATE FUNCTION pg_catalog.poco_sync_wait(target_id bigint, timeout interval DEFAULT '1 min')
RETURNS boolean LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco.sync_wait($1, pg_catalog.pg_current_snapshot()::text, extract(epoch FROM $2)::float8) $$;

-- Compare the learner with the platform's scope, table by table (src/verify.rs).
CREATE FUNCTION pg_catalog.poco_verify(target_id bigint, repair boolean DEFAULT false)
RETURNS TABLE(table_name text, platform_rows bigint, learner_rows bigint, equal boolean)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM poco.verify($1, $2) $$;

-- Grant what an application (the parent-facing page) needs to one role.
CREATE FUNCTION pg_catalog.poco_grant_usage(role_name name)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
            WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname LIKE 'poco\_%'
              AND p.proname NOT IN ('poco_rotate_key', 'poco_grant_usage', 'poco_grant_parent', 'poco_revoke_parent')
              AND (p.proname NOT LIKE 'poco\_scope\_%' OR p.proname = 'poco_scope_preview')
  LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, role_name);
  END LOOP;
  EXECUTE format('GRANT USAGE ON SCHEMA poco TO %I', role_name);
  EXECUTE format('GRANT EXECUTE ON FUNCTION poco.worker_status(), poco.job_progress(), poco.may_see(text) TO %I', role_name);
  EXECUTE format('GRANT SELECT ON poco.targets, poco.events, poco.worker, poco.jobs TO %I', role_name);
END $$;

-- Let a role act for one parent only (src/authz.rs): it gets what poco_grant_usage grants, and
-- every function that takes a parent, a target or a job, and the views, hold it to the
-- parents granted this way. Superuser only. Note that whoever may declare the scope
-- (poco_scope_*) decides what leaves the platform and runs its predicate with poco_sync's
-- rights: that is a superuser's power, never granted by these functions.
CREATE FUNCTION pg_catalog.poco_grant_parent(role_name name, parent_id text)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE p text := poco.canonical_parent(parent_id);
BEGIN
  IF (SELECT rolsuper FROM pg_roles WHERE rolname = role_name) THEN
    RAISE EXCEPTION 'role % is a superuser, which acts for every parent', role_name
      USING ERRCODE = '22023', HINT = 'Grant parents to ordinary roles (the ones an application SETs ROLE to).';
  END IF;
  INSERT INTO poco.parent_role (role, parent_id) VALUES (role_name::regrole, p) ON CONFLICT DO NOTHING;
  PERFORM poco_grant_usage(role_name);
  INSERT INTO poco.events (kind, parent_id, message, detail)
  VALUES ('parent_granted', p, format('role %s acts for parent %s', role_name, p), jsonb_build_object('role', role_name));
END $$;
CREATE FUNCTION pg_catalog.poco_grant_parent(role_name name, parent_id anyelement)
RETURNS void LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco_grant_parent($1, $2::text) $$;

CREATE FUNCTION pg_catalog.poco_revoke_parent(role_name name, parent_id text)
RETURNS boolean LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE p text := poco.canonical_parent(parent_id); n integer; f regprocedure;
BEGIN
  DELETE FROM poco.parent_role m WHERE m.role = role_name::regrole AND m.parent_id = p;
  GET DIAGNOSTICS n = ROW_COUNT;
  IF n > 0 THEN
    INSERT INTO poco.events (kind, parent_id, message, detail)
    VALUES ('parent_revoked', p, format('role %s no longer acts for parent %s', role_name, p), jsonb_build_object('role', role_name));
    -- Its last parent gone, the role does not fall back to acting for every parent: it
    -- loses what poco_grant_usage gave it.
    IF NOT EXISTS (SELECT 1 FROM poco.parent_role m WHERE m.role = role_name::regrole) THEN
      FOR f IN SELECT pr.oid::regprocedure FROM pg_proc pr
                WHERE pr.pronamespace = 'pg_catalog'::regnamespace AND pr.proname LIKE 'poco\_%' LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %I', f, role_name);
      END LOOP;
      EXECUTE format('REVOKE SELECT ON poco.targets, poco.events, poco.worker, poco.jobs FROM %I', role_name);
      EXECUTE format('REVOKE USAGE ON SCHEMA poco FROM %I', role_name);
    END IF;
  END IF;
  RETURN n > 0;
END $$;
CREATE FUNCTION pg_catalog.poco_revoke_parent(role_name name, parent_id anyelement)
RETURNS boolean LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT poco_revoke_parent($1, $2::text) $$;

DO $$
DECLARE f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
            WHERE (p.pronamespace = 'pg_catalog'::regnamespace AND p.proname LIKE 'poco\_%')
               OR p.pronamespace = 'poco'::regnamespace
  LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
END $$;

