-- The partitions of the actions and who owns each (src/cluster/partition.rs, src/db/partitions.rs).
-- An instance that takes a partition raises its epoch; every ledger write of an owner first
-- checks, in its own transaction and with a share lock on these rows, that the epochs it took
-- are still the epochs here. A takeover's UPDATE waits for writes in flight, and a write after
-- it finds the epoch moved on and is refused: an owner that was paused cannot write once
-- another has taken its partitions.
CREATE TABLE partition (
    id     SMALLINT PRIMARY KEY CHECK (id >= 0),
    owner  TEXT NOT NULL,
    epoch  BIGINT NOT NULL CHECK (epoch > 0),
    since  TIMESTAMPTZ NOT NULL DEFAULT now()
);
