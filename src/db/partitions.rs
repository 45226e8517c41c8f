//! Who owns which partition (the `partition` table), and the fence every ledger write of an
//! owner goes through.
//!
//! Taking partitions raises their epochs. The ledger writer then opens each flush with
//! [`Fence::check`]: in the flush's own transaction it takes a share lock on the rows of the
//! partitions it holds and counts those whose epoch is still the one it took. A takeover's
//! `UPDATE` waits for a flush in flight to commit; a flush after the takeover sees the new
//! epoch (Postgres re-reads a locked row's newest version) and is refused, so an owner that
//! was paused while another took its partitions can write nothing more. Not a session
//! advisory lock: those belong to a pooled connection and outlive whoever took them.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Row, SqlStr};

use super::{DbError, Schema};
use crate::cluster::Partition;

/// The partitions an instance took, with the epoch of each: what its writes are fenced by.
/// Clones share the set: in shared mode ([`take_one`]) it grows at every takeover.
#[derive(Debug, Clone)]
pub struct Fence {
    held: std::sync::Arc<std::sync::RwLock<Held>>,
    check: SqlStr,
    /// Whether partitions are taken one by one (`cluster.mode: shared`).
    shared: bool,
}

#[derive(Debug, Default)]
struct Held {
    ids: Vec<i16>,
    epochs: Vec<i64>,
}

impl Fence {
    fn new(schema: &Schema, held: Held, shared: bool) -> Self {
        Self {
            held: std::sync::Arc::new(std::sync::RwLock::new(held)),
            check: schema.sql(
                "SELECT count(*) FROM (SELECT p.id FROM {s}.partition p \
                   JOIN unnest($1::int2[], $2::int8[]) AS h(id, epoch) \
                     ON p.id = h.id AND p.epoch = h.epoch \
                   ORDER BY p.id FOR SHARE OF p) AS still",
            ),
            shared,
        }
    }

    /// A fence holding nothing yet, for an instance that takes partitions one by one.
    pub fn shared(schema: &Schema) -> Self {
        Self::new(schema, Held::default(), true)
    }

    /// Whether partitions are taken one by one (`cluster.mode: shared`).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    fn snapshot(&self) -> (Vec<i16>, Vec<i64>) {
        let held = self
            .held
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (held.ids.clone(), held.epochs.clone())
    }

    /// The partitions held and their epochs, in partition order.
    pub fn held(&self) -> Vec<(Partition, i64)> {
        let (ids, epochs) = self.snapshot();
        ids.into_iter()
            .zip(epochs)
            .map(|(id, epoch)| (Partition::try_from(id).unwrap_or(0), epoch))
            .collect()
    }

    /// Adds a partition just taken with `epoch` (replacing an older epoch of it).
    pub fn hold(&self, partition: Partition, epoch: i64) {
        let id = i16::try_from(partition).unwrap_or(i16::MAX);
        let mut held = self
            .held
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match held.ids.binary_search(&id) {
            Ok(at) => held.epochs[at] = epoch,
            Err(at) => {
                held.ids.insert(at, id);
                held.epochs.insert(at, epoch);
            }
        }
    }

    /// Whether every partition held still has the epoch taken, locking those rows until the
    /// end of the transaction `tx` runs in.
    pub async fn check(&self, tx: &mut PgConnection) -> Result<bool, DbError> {
        let (ids, epochs) = self.snapshot();
        if ids.is_empty() {
            return Ok(true);
        }
        let still: i64 = sqlx::query_scalar(self.check.clone())
            .bind(&ids)
            .bind(&epochs)
            .fetch_one(tx)
            .await
            .map_err(DbError::query(
                "checking this instance still owns its partitions",
            ))?;
        Ok(usize::try_from(still).ok() == Some(ids.len()))
    }

    /// Marks the partitions held as released with every write committed, in the transaction
    /// whose fence was just checked.
    pub async fn release_cleanly(
        &self,
        tx: &mut PgConnection,
        schema: &Schema,
    ) -> Result<(), DbError> {
        let (ids, epochs) = self.snapshot();
        sqlx::query(schema.sql(
            "UPDATE {s}.partition p SET released_cleanly = true \
             FROM unnest($1::int2[], $2::int8[]) AS h(id, epoch) \
             WHERE p.id = h.id AND p.epoch = h.epoch",
        ))
        .bind(&ids)
        .bind(&epochs)
        .execute(tx)
        .await
        .map_err(DbError::query("marking partitions released cleanly"))?;
        Ok(())
    }
}

/// Takes all `partitions` for `owner`: one row each, its epoch raised; rows of partitions
/// beyond the count (a count made smaller) are deleted. Returns the fence of what was taken.
pub async fn take_all(
    pool: &PgPool,
    schema: &Schema,
    partitions: u16,
    owner: &str,
) -> Result<Fence, DbError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(DbError::query("taking the partitions"))?;
    sqlx::query(schema.sql("DELETE FROM {s}.partition WHERE id >= $1"))
        .bind(i16::try_from(partitions).unwrap_or(i16::MAX))
        .execute(&mut *tx)
        .await
        .map_err(DbError::query("deleting partitions beyond the count"))?;
    let rows = sqlx::query(schema.sql(
        "INSERT INTO {s}.partition AS p (id, owner, epoch) \
         SELECT g::int2, $2, 1 FROM generate_series(0, $1 - 1) AS g \
         ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, epoch = p.epoch + 1, \
           since = now(), released_cleanly = false \
         RETURNING id, epoch",
    ))
    .bind(i32::from(partitions))
    .bind(owner)
    .fetch_all(&mut *tx)
    .await
    .map_err(DbError::query("taking the partitions"))?;
    tx.commit()
        .await
        .map_err(DbError::query("committing the partitions taken"))?;
    let mut taken: Vec<(i16, i64)> = rows
        .iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("epoch")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(DbError::query("reading the partitions taken"))?;
    taken.sort_unstable();
    let (ids, epochs) = taken.into_iter().unzip();
    Ok(Fence::new(schema, Held { ids, epochs }, false))
}

/// What [`take_one`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub epoch: i64,
    /// Whether the previous owner released it with every ledger write committed.
    pub released_cleanly: bool,
}

/// Takes one partition for `owner` (shared mode): its epoch raised (from now on a write of
/// its previous owner is refused), its clean-release mark read and cleared.
pub async fn take_one(
    pool: &PgPool,
    schema: &Schema,
    partition: Partition,
    owner: &str,
) -> Result<Taken, DbError> {
    let id = i16::try_from(partition).unwrap_or(i16::MAX);
    let mut tx = pool
        .begin()
        .await
        .map_err(DbError::query("taking a partition"))?;
    let before: Option<bool> = sqlx::query_scalar(
        schema.sql("SELECT released_cleanly FROM {s}.partition WHERE id = $1 FOR UPDATE"),
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(DbError::query("reading a partition's row"))?;
    let epoch: i64 = sqlx::query_scalar(schema.sql(
        "INSERT INTO {s}.partition AS p (id, owner, epoch) VALUES ($1, $2, 1) \
         ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, epoch = p.epoch + 1, \
           since = now(), released_cleanly = false \
         RETURNING epoch",
    ))
    .bind(id)
    .bind(owner)
    .fetch_one(&mut *tx)
    .await
    .map_err(DbError::query("taking a partition"))?;
    tx.commit()
        .await
        .map_err(DbError::query("committing a partition taken"))?;
    Ok(Taken {
        epoch,
        released_cleanly: before.unwrap_or(false),
    })
}

/// Execution ids in one block of [`take_id_block`].
pub const ID_BLOCK: u64 = 1 << 32;

/// The first id of a block of 2^32 execution ids of this run's own (shared mode), above every
/// id the ledger holds and every block handed out before.
pub async fn take_id_block(pool: &PgPool, schema: &Schema) -> Result<u64, DbError> {
    let err = || DbError::query("taking a block of execution ids");
    let mut tx = pool.begin().await.map_err(err())?;
    // Serialises the raise and the draw between instances starting at once (a lock of this
    // transaction only, gone at its end).
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("{}.id_block", schema.name()))
        .execute(&mut *tx)
        .await
        .map_err(err())?;
    let block: i64 = sqlx::query_scalar(schema.sql(
        "SELECT nextval('{s}.id_block') FROM (SELECT setval('{s}.id_block', GREATEST( \
           (SELECT last_value FROM {s}.id_block), \
           (SELECT COALESCE(max(id), 0) FROM {s}.execution) >> 32))) AS raised",
    ))
    .fetch_one(&mut *tx)
    .await
    .map_err(err())?;
    tx.commit().await.map_err(err())?;
    // Ids are positive i64: 2^31 blocks before they run out.
    Ok(u64::try_from(block)
        .unwrap_or(1)
        .max(1)
        .saturating_mul(ID_BLOCK))
}

/// One row of the `partition` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRow {
    pub id: Partition,
    pub owner: String,
    pub epoch: i64,
    pub since: DateTime<Utc>,
}

/// Every partition with its owner, in partition order.
pub async fn list(pool: &PgPool, schema: &Schema) -> Result<Vec<PartitionRow>, DbError> {
    let rows =
        sqlx::query(schema.sql("SELECT id, owner, epoch, since FROM {s}.partition ORDER BY id"))
            .fetch_all(pool)
            .await
            .map_err(DbError::query("reading the partitions"))?;
    rows.iter()
        .map(|r| {
            let id: i16 = r.try_get("id")?;
            Ok(PartitionRow {
                id: Partition::try_from(id).unwrap_or(0),
                owner: r.try_get("owner")?,
                epoch: r.try_get("epoch")?,
                since: r.try_get("since")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(DbError::query("reading the partitions"))
}
