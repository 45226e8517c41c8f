-- Cancels that came before their requests (the two travel on different RabbitMQ queues). The
-- executor marks the id in memory and keeps it here before it acknowledges the cancel, so a
-- restart between the cancel and the request still cancels the request when it comes
-- (src/core/ahead.rs, src/db/ledger.rs). A row is deleted when its request is canceled; the
-- newest 100,000 are kept, as in memory. Recovery marks again the rows whose request has not
-- come.
CREATE TABLE cancel_ahead (
    execution_id BIGINT PRIMARY KEY,
    recorded     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX cancel_ahead_recorded ON cancel_ahead (recorded);
