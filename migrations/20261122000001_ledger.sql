-- The executor's ledger and the operators' window (see src/db/mod.rs).
--
-- Every name here is unqualified on purpose: the executor runs this file with `search_path`
-- set to the configured schema (`database.schema`, default `attune`), so one migration serves
-- any schema and its checksum does not depend on the schema's name.

-- One row per action ref, created the first time the executor sees the action. Operators own
-- `enabled`, `priority`, `tags` and the limits; the executor polls them (src/db/policies.rs).
CREATE TABLE action (
    id                     BIGSERIAL PRIMARY KEY,
    ref                    TEXT NOT NULL UNIQUE,
    enabled                BOOLEAN NOT NULL DEFAULT true,
    priority               INT NOT NULL DEFAULT 5,
    tags                   JSONB NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(tags) = 'array'),
    -- NULL: the limit from the configuration applies.
    concurrency_limit      INT NULL CHECK (concurrency_limit > 0),
    rate_limit_max         INT NULL CHECK (rate_limit_max > 0),
    rate_limit_per_seconds INT NULL CHECK (rate_limit_per_seconds > 0),
    created                TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated                TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A rate limit is a pair; half of one would be silently ignored, so refuse it.
    CONSTRAINT action_rate_limit_is_a_pair
        CHECK ((rate_limit_max IS NULL) = (rate_limit_per_seconds IS NULL))
);

-- Operators change actions with plain UPDATEs (the runbook's emergency step does not set
-- `updated`), so the database keeps `updated` truthful itself.
CREATE FUNCTION action_touch_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW IS DISTINCT FROM OLD THEN
        NEW.updated := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER action_touch_updated
    BEFORE UPDATE ON action
    FOR EACH ROW EXECUTE FUNCTION action_touch_updated();

-- One row per accepted execution. Written only by the ledger writer, in batches.
CREATE TABLE execution (
    id            BIGINT PRIMARY KEY CHECK (id > 0),
    action        BIGINT NOT NULL REFERENCES action (id),
    status        TEXT NOT NULL CHECK (status IN (
                      'requested', 'scheduled', 'running',
                      'succeeded', 'failed', 'canceled', 'timeout')),
    -- When the executor accepted it (the core's clock, not the time of the write).
    created       TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- When its status last changed (the core's clock).
    updated       TIMESTAMPTZ NOT NULL DEFAULT now(),
    result        JSONB,
    request_id    TEXT,
    parameters    JSONB,
    -- Acceptance order; recovery puts waiting executions back in this order. Timestamps can
    -- tie, a sequence cannot.
    accept_seq    BIGINT GENERATED ALWAYS AS IDENTITY,
    enqueued_at   TIMESTAMPTZ NOT NULL,
    dispatched_at TIMESTAMPTZ,
    -- How many times it was admitted to a slot (0 while it waits).
    attempt       INT NOT NULL DEFAULT 0
);

-- The runbook's per-action queries filter on action and a time window on created.
CREATE INDEX execution_action_created_idx ON execution (action, created);

-- Live executions only: the runbook's stuck-execution queries and start-up recovery. Partial,
-- so that the index stays as small as the live set however long the history grows.
CREATE INDEX execution_live_status_updated_idx ON execution (status, updated)
    WHERE status IN ('requested', 'scheduled', 'running');

-- The latest counters of every action, upserted by the stats writer when they change.
CREATE TABLE queue_stats (
    action_id          BIGINT PRIMARY KEY REFERENCES action (id),
    queue_length       INT NOT NULL DEFAULT 0,
    active_count       INT NOT NULL DEFAULT 0,
    max_concurrent     INT NOT NULL DEFAULT 1,
    oldest_enqueued_at TIMESTAMPTZ NULL,
    total_enqueued     BIGINT NOT NULL DEFAULT 0,
    total_completed    BIGINT NOT NULL DEFAULT 0,
    -- When anything about the queue last changed (the core's clock).
    last_updated       TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- When the queue last moved forward (an admission, a completion or a removal). A queue
    -- that only grows has a fresh last_updated and an old last_progress.
    last_progress      TIMESTAMPTZ NULL
);

-- The runbook creates this table itself with CREATE TABLE IF NOT EXISTS; the shape is the
-- runbook's, column for column, and IF NOT EXISTS lets either side come first.
CREATE TABLE IF NOT EXISTS queue_snapshots (
    snapshot_time  TIMESTAMPTZ DEFAULT NOW(),
    action_id      BIGINT,
    queue_length   INT,
    active_count   INT,
    total_enqueued BIGINT
);

-- The growth-rate query self-joins snapshots per action within time windows; the weekly
-- clean-up deletes by time.
CREATE INDEX IF NOT EXISTS queue_snapshots_action_time_idx
    ON queue_snapshots (action_id, snapshot_time);
CREATE INDEX IF NOT EXISTS queue_snapshots_time_idx ON queue_snapshots (snapshot_time);
