-- ingestd 0005: refresh one aggregate at a time. ingestd_refresh_aggregates() (0003) refreshes
-- both views in one call, so one transaction: on plain PostgreSQL the full recompute of
-- hourly_spread_avg can outlast the statement timeout at a collector's volumes (many spreads per
-- second), and its rollback
-- then takes the cheap daily_pnl_summary refresh (what traders read) down with it. ingestd now
-- refreshes each view in a transaction of its own, daily first.
CREATE OR REPLACE FUNCTION ingestd_refresh_aggregate(view_name TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql SECURITY DEFINER
AS $fn$
DECLARE
    populated BOOLEAN;
BEGIN
    -- Identifiers only from this list: the argument is never pasted into SQL unchecked.
    IF view_name NOT IN ('daily_pnl_summary', 'hourly_spread_avg') THEN
        RAISE EXCEPTION 'ingestd_refresh_aggregate: % is not one of ingestd''s aggregates',
            view_name USING ERRCODE = '22023';
    END IF;
    SELECT c.relispopulated INTO populated
    FROM pg_class c
    WHERE c.oid = to_regclass(view_name) AND c.relkind = 'm';
    IF populated IS NULL THEN
        RETURN FALSE;  -- not a plain materialized view (a continuous aggregate refreshes itself)
    END IF;
    IF populated THEN
        EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY %I', view_name);
    ELSE
        EXECUTE format('REFRESH MATERIALIZED VIEW %I', view_name);  -- CONCURRENTLY needs data
    END IF;
    RETURN TRUE;
END
$fn$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION ingestd_refresh_aggregate(text) '
                   'SET search_path = pg_catalog, %I, pg_temp', current_schema());
    REVOKE ALL ON FUNCTION ingestd_refresh_aggregate(text) FROM PUBLIC;
END
$$;
