//! The `ref → action.id` cache shared by the ledger and the stats writer.
//!
//! An `action` row is created the first time either writer meets an action. The ids are cached
//! only after the statement that created or read them has committed, so a rolled-back write can
//! never leave an id in the cache that the table does not have.

use std::collections::{HashMap, HashSet};

use dashmap::DashMap;
use sqlx::postgres::PgPool;
use sqlx::{Row, SqlStr};

use super::{DbError, Schema};
use crate::model::ActionRef;

/// Cached `action.id` of every action ref seen.
#[derive(Debug)]
pub struct ActionIds {
    ids: DashMap<ActionRef, i64>,
    /// Creates the rows that are missing and returns the ids of all the refs asked for.
    upsert: SqlStr,
}

/// Another writer may create the same action concurrently; its row is then invisible to our
/// statement's snapshot and we ask again. Two passes always suffice; the third is slack.
const RESOLVE_PASSES: usize = 3;

impl ActionIds {
    pub fn new(schema: &Schema) -> Self {
        // Rows that exist are filtered out before the INSERT so that BIGSERIAL values are not
        // burned on conflicts; ON CONFLICT still covers a concurrent insert of the same ref.
        // The outer SELECT cannot see rows the CTE inserted (same snapshot), hence the UNION.
        let upsert = schema.sql(
            "WITH wanted AS (SELECT DISTINCT unnest($1::text[]) AS ref), \
             created AS ( \
               INSERT INTO {s}.action (ref) \
               SELECT w.ref FROM wanted w \
               WHERE NOT EXISTS (SELECT 1 FROM {s}.action a WHERE a.ref = w.ref) \
               ON CONFLICT (ref) DO NOTHING \
               RETURNING id, ref) \
             SELECT id, ref FROM created \
             UNION ALL \
             SELECT a.id, a.ref FROM {s}.action a JOIN wanted w ON w.ref = a.ref",
        );
        Self {
            ids: DashMap::new(),
            upsert,
        }
    }

    /// The cached id of an action, if it has been resolved.
    pub fn get(&self, action: &ActionRef) -> Option<i64> {
        self.ids.get(action).map(|id| *id)
    }

    /// Makes sure every ref has a row and a cached id. Returns the number of statements run
    /// (0 when everything was cached), for the writers' statement counters.
    pub async fn ensure<'a>(
        &self,
        pool: &PgPool,
        refs: impl IntoIterator<Item = &'a ActionRef>,
    ) -> Result<u64, DbError> {
        let mut missing: Vec<ActionRef> = {
            let mut seen = HashSet::new();
            refs.into_iter()
                .filter(|r| !self.ids.contains_key(*r) && seen.insert(*r))
                .cloned()
                .collect()
        };
        let mut statements = 0;
        for _ in 0..RESOLVE_PASSES {
            if missing.is_empty() {
                break;
            }
            let names: Vec<&str> = missing.iter().map(|r| r.as_str()).collect();
            let rows = sqlx::query(self.upsert.clone())
                .bind(&names)
                .fetch_all(pool)
                .await
                .map_err(DbError::query("creating action rows"))?;
            statements += 1;
            let by_name: HashMap<&str, &ActionRef> =
                missing.iter().map(|r| (r.as_str(), r)).collect();
            for row in rows {
                let id: i64 = row
                    .try_get("id")
                    .map_err(DbError::query("reading action ids"))?;
                let name: String = row
                    .try_get("ref")
                    .map_err(DbError::query("reading action refs"))?;
                if let Some(action) = by_name.get(name.as_str()) {
                    self.ids.insert((*action).clone(), id);
                }
            }
            missing.retain(|r| !self.ids.contains_key(r));
        }
        if missing.is_empty() {
            Ok(statements)
        } else {
            Err(DbError::Query {
                context: "creating action rows",
                source: sqlx::Error::RowNotFound,
            })
        }
    }
}
