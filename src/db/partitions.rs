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
#[derive(Debug, Clone)]
pub struct Fence {
    ids: Vec<i16>,
    epochs: Vec<i64>,
    check: SqlStr,
}

impl Fence {
    /// The partitions held and their epochs, in partition order.
    pub fn held(&self) -> impl Iterator<Item = (Partition, i64)> + '_ {
        self.ids
            .iter()
            .zip(&self.epochs)
            .map(|(id, epoch)| (Partition::try_from(*id).unwrap_or(0), *epoch))
    }

    /// Whether every partition held still has the epoch taken, locking those rows until the
    /// end of the transaction `tx` runs in.
    pub async fn check(&self, tx: &mut PgConnection) -> Result<bool, DbError> {
        let still: i64 = sqlx::query_scalar(self.check.clone())
            .bind(&self.ids)
            .bind(&self.epochs)
            .fetch_one(tx)
            .await
            .map_err(DbError::query(
                "checking this instance still owns its partitions",
            ))?;
        Ok(usize::try_from(still).ok() == Some(self.ids.len()))
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
           since = now() \
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
    Ok(Fence {
        ids,
        epochs,
        check: schema.sql(
            "SELECT count(*) FROM (SELECT p.id FROM {s}.partition p \
               JOIN unnest($1::int2[], $2::int8[]) AS h(id, epoch) \
                 ON p.id = h.id AND p.epoch = h.epoch \
               ORDER BY p.id FOR SHARE OF p) AS still",
        ),
    })
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
