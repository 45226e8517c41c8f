-- The runbook computes completion_pct as
--   ROUND(qs.total_completed::float / NULLIF(qs.total_enqueued, 0) * 100, 2)
-- which calls round(double precision, integer). Stock Postgres has only round(numeric, integer)
-- (and no implicit cast from double precision to numeric), so the query fails as written.
-- The overload is added here so that the runbook runs unchanged:
--
-- - in the ledger's schema: it is on the search path of the runbook's role `attune`, whose
--   default search_path "$user", public names the schema `attune`;
-- - in `public` as well, when that schema exists, the migrating role may create there and no
--   such function is there yet, so that any role with the default search_path finds it.
--
-- It rounds exactly as round(numeric, integer) does and returns double precision.

CREATE FUNCTION round(double precision, integer) RETURNS double precision
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN pg_catalog.round($1::numeric, $2)::double precision;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'public') THEN
        IF pg_catalog.has_schema_privilege('public', 'CREATE')
           AND NOT EXISTS (
               SELECT 1
               FROM pg_catalog.pg_proc p
               JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
               WHERE n.nspname = 'public'
                 AND p.proname = 'round'
                 AND p.proargtypes = '701 23'::pg_catalog.oidvector) THEN
            CREATE FUNCTION public.round(double precision, integer) RETURNS double precision
                LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
                RETURN pg_catalog.round($1::numeric, $2)::double precision;
        END IF;
    END IF;
END
$$;
