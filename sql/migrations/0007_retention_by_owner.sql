-- ingestd 0007: retention is the owner's alone. Until now ingestd_delete_expired() and
-- ingestd_set_retention() were SECURITY DEFINER and executable by the writer role (sql/roles.sql
-- granted EXECUTE on every ingestd_* function), so a writer login could delete any rows of
-- spreads, fx_rates, orders and trades older than any interval it chose, or shorten a retention
-- policy, although it has no DELETE grant. Now both run with the rights of their caller
-- (SECURITY INVOKER) and only the owner may execute them: a role that may not DELETE from the
-- table, or does not own the hypertable, cannot remove a row through them even if someone grants
-- EXECUTE by mistake. Retention runs as the owner with the periods of its configuration
-- (`ingestd retention`, `ingestd migrate`, or `ingestd run` when it runs as the owner).
-- trades has no retention (trading history is kept): the functions no longer accept it.

CREATE OR REPLACE FUNCTION ingestd_delete_expired(table_name TEXT, keep INTERVAL, max_rows INTEGER)
RETURNS BIGINT
LANGUAGE plpgsql SECURITY INVOKER
AS $fn$
DECLARE
    deleted BIGINT;
BEGIN
    IF table_name IS NULL OR table_name NOT IN ('spreads', 'fx_rates', 'orders') THEN
        RAISE EXCEPTION 'ingestd_delete_expired: % has no retention', table_name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF keep IS NULL OR keep <= INTERVAL '0' OR max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'ingestd_delete_expired: keep must be positive and max_rows >= 1'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Nested IFs: one expression naming timescaledb_information would fail on plain PostgreSQL.
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        IF EXISTS (
            SELECT 1 FROM timescaledb_information.hypertables
            WHERE format('%I.%I', hypertable_schema, hypertable_name)::regclass
                  = to_regclass(table_name)) THEN
            RAISE EXCEPTION 'ingestd_delete_expired: % is a hypertable; its retention policy drops chunks',
                table_name USING ERRCODE = 'wrong_object_type';
        END IF;
    END IF;
    EXECUTE format(
        'DELETE FROM %1$I WHERE ctid = ANY (ARRAY('
        'SELECT ctid FROM %1$I WHERE "timestamp" < now() - $1 ORDER BY "timestamp" LIMIT $2))',
        table_name) USING keep, max_rows;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$fn$;

CREATE OR REPLACE FUNCTION ingestd_set_retention(table_name TEXT, keep INTERVAL)
RETURNS TEXT
LANGUAGE plpgsql SECURITY INVOKER
AS $fn$
DECLARE
    rel REGCLASS;
    job INTEGER;
    current_keep INTERVAL;
BEGIN
    IF table_name IS NULL OR table_name NOT IN ('spreads', 'fx_rates', 'orders') THEN
        RAISE EXCEPTION 'ingestd_set_retention: % has no retention', table_name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF keep IS NOT NULL AND keep <= INTERVAL '0' THEN
        RAISE EXCEPTION 'ingestd_set_retention: keep must be positive (NULL removes the policy)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    rel := to_regclass(table_name);
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN 'plain';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM timescaledb_information.hypertables
        WHERE format('%I.%I', hypertable_schema, hypertable_name)::regclass = rel) THEN
        RETURN 'plain';
    END IF;
    -- TimescaleDB checks that the caller owns the hypertable before it adds or removes a policy.
    SELECT j.job_id, (j.config ->> 'drop_after')::INTERVAL INTO job, current_keep
    FROM timescaledb_information.jobs j
    WHERE j.proc_name = 'policy_retention'
      AND format('%I.%I', j.hypertable_schema, j.hypertable_name)::regclass = rel;
    IF keep IS NULL THEN
        IF job IS NULL THEN
            RETURN 'unchanged';
        END IF;
        PERFORM remove_retention_policy(rel);
        RETURN 'removed';
    END IF;
    IF job IS NOT NULL AND current_keep = keep THEN
        RETURN 'unchanged';
    END IF;
    IF job IS NOT NULL THEN
        PERFORM remove_retention_policy(rel);
    END IF;
    PERFORM add_retention_policy(rel, drop_after => keep);
    RETURN CASE WHEN job IS NULL THEN 'added' ELSE 'changed' END;
END
$fn$;

-- Nobody but the owner may execute them: not PUBLIC (PostgreSQL's default for a new function),
-- not the groups that earlier versions of sql/roles.sql granted EXECUTE on every ingestd_*
-- function (the current sql/roles.sql grants an explicit list that leaves these out).
DO $$
DECLARE
    fn TEXT;
    grp TEXT;
BEGIN
    FOREACH fn IN ARRAY ARRAY['ingestd_delete_expired(text, interval, integer)',
                              'ingestd_set_retention(text, interval)'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp',
                       fn, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
        FOREACH grp IN ARRAY ARRAY['ingestd_writer', 'ingestd_reader'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = grp) THEN
                EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I', fn, grp);
            END IF;
        END LOOP;
    END LOOP;
    -- The legacy refresh-everything function (replaced by ingestd_refresh_aggregate in 0005)
    -- is no longer the writer's either.
    FOREACH grp IN ARRAY ARRAY['ingestd_writer', 'ingestd_reader'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = grp) THEN
            EXECUTE format('REVOKE ALL ON FUNCTION ingestd_refresh_aggregates() FROM %I', grp);
        END IF;
    END LOOP;
END
$$;
