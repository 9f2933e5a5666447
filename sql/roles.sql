-- ingestd's database roles: least privilege for the daemon and for dashboards.
--
-- Applied by `ingestd roles` (idempotent; run it after every `ingestd migrate`, as compose does)
-- as the role that owns ingestd's tables. This is not a numbered migration: roles belong to the
-- whole cluster, creating them needs CREATEROLE, and the grants must be re-applied whenever a
-- migration adds a table. No password is in this file: `ingestd roles` creates the login roles
-- and sets their passwords from the environment (see docs/security.md).
--
--   ingestd_writer  NOLOGIN group for `ingestd run` (its refreshes and metrics keys), `import-csv` and
--                   `verify-csv`: reads and appends its own tables, updates only what ingestd
--                   updates, deletes only parked position closes, refreshes the two
--                   materialized views through ingestd_refresh_aggregate(); no DDL, no
--                   TRUNCATE, no retention (the owner's), nothing else.
--   ingestd_reader  NOLOGIN group for dashboards: SELECT on ingestd's tables and views, only.

DO $$
DECLARE
    -- The role that ran the migrations (it owns the ledger) keeps its access explicitly.
    schema_owner name := (SELECT tableowner FROM pg_tables
                          WHERE schemaname = 'public' AND tablename = 'ingestd_migrations');
BEGIN
    IF schema_owner IS NULL THEN
        RAISE EXCEPTION 'ingestd roles: run `ingestd migrate` first (no ingestd_migrations)';
    END IF;
    -- A DBA may create the two groups beforehand; then the owner needs no CREATEROLE.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ingestd_writer') THEN
        CREATE ROLE ingestd_writer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ingestd_reader') THEN
        CREATE ROLE ingestd_reader NOLOGIN;
    END IF;
    -- PUBLIC may connect to (and create temp tables in) every new database by default; here
    -- only the owners and the two groups may.
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I',
                   current_database(), schema_owner);
    EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO ingestd_writer',
                   current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO ingestd_reader', current_database());
    -- Tables that later migrations create (as schema_owner) are readable by the reader.
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA public '
                   'GRANT SELECT ON TABLES TO ingestd_reader', schema_owner);
END
$$;

-- Nobody but the owner creates objects in the schema (PostgreSQL 15's default, made explicit for
-- databases created by older versions).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO ingestd_writer, ingestd_reader;

-- Start from nothing, so that a grant removed from this file is removed from the database too.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM ingestd_writer, ingestd_reader;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM ingestd_writer, ingestd_reader;

-- The writer: exactly the statements in ingestd/daemon/sinks/postgres.py and ingestd/daemon/migrations.py.
-- COPY needs INSERT; the staging merge reads the table's shape (SELECT) into a TEMP table.
GRANT SELECT, INSERT ON spreads, fx_rates, dead_letters TO ingestd_writer;
-- orders/trades: position_id is linked by UPDATE once the position exists.
GRANT SELECT, INSERT, UPDATE ON orders, trades, positions TO ingestd_writer;
-- A parked close is deleted when its open lands (the only DELETE ingestd issues).
GRANT SELECT, INSERT, UPDATE, DELETE ON position_closes_pending TO ingestd_writer;
-- `ingestd run` refuses a schema that is behind: it reads the ledger, never writes it.
GRANT SELECT ON ingestd_migrations TO ingestd_writer;
-- Maintenance (ingestd/daemon/maintenance.py, part of `ingestd run`): a replica claims a task's round
-- with INSERT ... ON CONFLICT DO UPDATE on its row and records the outcome with UPDATE (a failure
-- with INSERT ... ON CONFLICT); it reads the two aggregates to write the metrics:* Redis keys.
-- Refreshing goes through ingestd_refresh_aggregate() below; retention is the owner's.
GRANT SELECT, INSERT, UPDATE ON ingestd_maintenance TO ingestd_writer;
GRANT SELECT ON daily_pnl_summary, hourly_spread_avg TO ingestd_writer;
-- `ingestd import-csv` (run as the writer) records how far it got in each file.
GRANT SELECT, INSERT, UPDATE ON csv_import_checkpoints TO ingestd_writer;
GRANT SELECT, INSERT, UPDATE ON alerts, producer_gaps TO ingestd_writer;
GRANT SELECT, INSERT, DELETE ON producer_seq_ranges TO ingestd_writer;
-- The heartbeat history (ingestd/daemon/liveness.py) extends an interval or opens one; never deletes
-- (retention is the owner's). The view merges its rows for readers and `ingestd stats`.
GRANT SELECT, INSERT, UPDATE ON heartbeat_history TO ingestd_writer;
GRANT SELECT ON component_liveness TO ingestd_writer;
-- BIGSERIAL ids: nextval() needs USAGE on the sequences.
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO ingestd_writer;

-- The reader: every table and view in the schema (and, by the default privileges above, those
-- later migrations add).
GRANT SELECT ON ALL TABLES IN SCHEMA public TO ingestd_reader;

-- Functions. PostgreSQL lets PUBLIC execute every new function, and a SECURITY DEFINER function
-- runs with its owner's rights: a function a group may execute is a privilege as wide as its body.
-- So start from nothing: no function of ingestd's schema is executable by PUBLIC or the groups
-- (an extension's functions are left alone: those that drop data, like TimescaleDB's drop_chunks
-- and policy functions, check that the caller owns the table). Then grant exactly this list, each
-- unable to remove a row or shorten retention:
--   ingestd_refresh_aggregate(text)  writer: recomputes one of the two materialized views from
--                                    the tables (REFRESH needs ownership of the view)
--   ingestd_queue_backfill(timestamptz, timestamptz)  writer: a batch of old spreads queues
--                                    its hours for the continuous aggregate's refresh (0009)
--   time_bucket(interval, timestamptz)  writer and reader, plain PostgreSQL only: the aggregates'
--                                    and ad-hoc queries; IMMUTABLE SQL, runs with the caller's rights
-- Retention (ingestd_delete_expired, ingestd_set_retention) is the owner's alone: those functions
-- run with the caller's rights and are executable by nobody else (migration 0007).
-- tests/integration/test_roles.py enumerates what each group may execute against this list.
DO $$
DECLARE
    routine regprocedure;
BEGIN
    FOR routine IN
        SELECT p.oid::regprocedure
        FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.prokind IN ('f', 'p')
          AND NOT EXISTS (SELECT 1 FROM pg_depend AS d
                          WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                            AND d.deptype = 'e')
    LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM PUBLIC, ingestd_writer, ingestd_reader',
                       routine);
    END LOOP;
    GRANT EXECUTE ON FUNCTION ingestd_refresh_aggregate(text) TO ingestd_writer;
    GRANT EXECUTE ON FUNCTION ingestd_queue_backfill(timestamptz, timestamptz) TO ingestd_writer;
    -- On TimescaleDB time_bucket is the extension's (PUBLIC may execute it).
    IF EXISTS (SELECT 1 FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
               WHERE n.nspname = 'public' AND p.oid = to_regprocedure(
                         'public.time_bucket(interval, timestamptz)')
                 AND NOT EXISTS (SELECT 1 FROM pg_depend AS d
                                 WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                   AND d.deptype = 'e')) THEN
        GRANT EXECUTE ON FUNCTION time_bucket(interval, timestamptz)
            TO ingestd_writer, ingestd_reader;
    END IF;
END
$$;
