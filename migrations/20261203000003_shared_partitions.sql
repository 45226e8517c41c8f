-- cluster.mode: shared (src/cluster/takeover.rs). An owner that stops with every ledger write
-- committed marks its partitions released cleanly; the instance that takes one next need not
-- treat its waiting executions as possibly sent. Any takeover clears the mark.
ALTER TABLE partition ADD COLUMN released_cleanly BOOLEAN NOT NULL DEFAULT false;

-- Blocks of 2^32 execution ids, one per run of an instance in shared mode: ids the executor
-- assigns (requests that come without one) never collide between instances.
CREATE SEQUENCE id_block AS BIGINT MINVALUE 0 START WITH 0;
