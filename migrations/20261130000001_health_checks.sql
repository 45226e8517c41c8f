-- Operations: the health-check history, policies set over HTTP, and what the ledger purge
-- needs. Unqualified names, like every migration here: the executor runs this file with
-- `search_path` set to `database.schema` (see src/db/mod.rs).

-- One row per health check (src/ops/health.rs), written by src/db/ops.rs and deleted after
-- 30 days by the purge cycle. The totals are columns so that a history query needs no JSON;
-- `checks` keeps each check's value, thresholds and verdict as `/health` served them.
CREATE TABLE health_checks (
    id             BIGSERIAL PRIMARY KEY,
    checked_at     TIMESTAMPTZ NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('healthy', 'degraded', 'unhealthy')),
    emergency_mode BOOLEAN NOT NULL,
    checks         JSONB NOT NULL CHECK (jsonb_typeof(checks) = 'object'),
    actions        INT NOT NULL,
    queued         BIGINT NOT NULL,
    active         BIGINT NOT NULL,
    -- NULL when the DLQ size could not be read or the DLQ is disabled.
    dlq            BIGINT NULL,
    stuck          BIGINT NOT NULL,
    stalled        BIGINT NOT NULL
);

-- "How was it last night" and the purge both go by time.
CREATE INDEX health_checks_checked_at_idx ON health_checks (checked_at);

-- A policy set with `PUT /api/v1/actions/{ref}/policy` is the whole policy, not a layer over
-- the configuration: its `enabled` wins over `policies.actions.<ref>.enabled` and NULL rate-limit
-- columns mean "no rate limit" rather than "the configured one". Without this flag the poller
-- (src/db/policies.rs) would read such a row as a layer and undo part of what the operator set.
-- Operators' plain UPDATEs keep working on such a row: the row is still the one truth.
ALTER TABLE action ADD COLUMN policy_pinned BOOLEAN NOT NULL DEFAULT false;

-- The purge deletes finished executions by age in batches; without this index each batch would
-- scan the whole history. Partial, so live executions (the hot rows) are not in it; it costs
-- one index insertion when an execution finishes.
CREATE INDEX execution_finished_updated_idx ON execution (updated)
    WHERE status IN ('succeeded', 'failed', 'canceled', 'timeout');
