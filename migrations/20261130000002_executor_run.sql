-- Whether the last executor to use this ledger stopped cleanly. Recovery (src/db/recovery.rs)
-- raises `attempt` of the executions at the head of each waiting line, because a dispatch may
-- leave before its admission is committed; after a clean stop every admission was committed, so
-- there is nothing to raise. One row; recovery sets `stopped_cleanly` false before anything is
-- dispatched, and a shutdown that committed everything sets it true as its last write.
CREATE TABLE executor_run (
    id              SMALLINT PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    started_at      TIMESTAMPTZ NOT NULL,
    stopped_at      TIMESTAMPTZ NULL,
    stopped_cleanly BOOLEAN NOT NULL
);
