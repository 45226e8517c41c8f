//! The `action` table as a policy source, and the poller that applies operators' changes.
//!
//! Operators change policies with plain SQL, e.g. the runbook's emergency step
//! `UPDATE attune.action SET enabled = false WHERE priority < 5 OR tags @> '["low-priority"]';`.
//! The poller reads the policy columns of every action each `interval` (default 1 s) and
//! compares the policy each row gives with the one the executor has; an action where they
//! differ gets the row's through [`Executor::set_policy`] at once, so a disabled action stops
//! dispatching within `interval` plus one mailbox turn, and resumes in FIFO order when enabled
//! again.
//!
//! Why compare values rather than watch `updated` (which a trigger keeps current): a
//! transaction that commits late carries an `updated` older than one the poller has already
//! seen, and would be missed. Reading the whole table is one sequential scan of a table with
//! one row per action, a few thousand rows at most: cheap once a second.
//!
//! A column that is NULL means "what the configuration says": the fallback [`PolicySource`]
//! (built from `policies.default` and `policies.actions.*`) supplies it. `enabled` is
//! never NULL; an action is enabled only if its row and the fallback both say so.
//!
//! Except on a *pinned* row (`policy_pinned`), which `PUT /api/v1/actions/{ref}/policy`
//! writes through [`DbPolicyStore`]: there the row is the whole policy, so NULL rate-limit
//! columns mean no rate limit and `enabled` alone decides. Either way the table is the one
//! truth: every poll compares each row's policy with the executor's and corrects the executor
//! where they differ, not only where the row changed, so two policy PUTs racing each other (or
//! the poll) cannot leave the executor on a policy the table does not hold for longer than one
//! `interval`.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::future::BoxFuture;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Row, SqlStr};
use tokio::time::MissedTickBehavior;

use super::{DbError, Schema, Worker};
use crate::core::{ActionPolicy, Executor, PolicyPatch, PolicySource, RateLimit};
use crate::model::ActionRef;
use crate::ops::hooks::{HookError, PolicyStore};

/// How often the poller reads the `action` table by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Longest one read or write of the `action` table may take while holding the lock that keeps
/// the poller and `PUT …/policy` apart.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// What an `action` row says about the policy; `None` defers to the fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPolicy {
    /// The operators' switch (the runbook's emergency UPDATE).
    pub enabled: bool,
    /// `None`: the configured limit.
    pub concurrency_limit: Option<NonZeroU32>,
    /// `None`: the configured rate limit, or none at all on a pinned row.
    pub rate_limit: Option<RateLimit>,
    /// Set over HTTP: the row is the whole policy rather than a layer over the configuration
    /// (see the module docs).
    pub pinned: bool,
}

impl StoredPolicy {
    /// This row's policy over the configured one.
    pub fn over(&self, fallback: ActionPolicy) -> ActionPolicy {
        if self.pinned {
            return ActionPolicy {
                concurrency_limit: self.concurrency_limit.unwrap_or(fallback.concurrency_limit),
                rate_limit: self.rate_limit,
                enabled: self.enabled,
            };
        }
        ActionPolicy {
            concurrency_limit: self.concurrency_limit.unwrap_or(fallback.concurrency_limit),
            rate_limit: self.rate_limit.or(fallback.rate_limit),
            enabled: self.enabled && fallback.enabled,
        }
    }
}

/// A [`PolicySource`] that answers from the last read of the `action` table, falling back to
/// the configuration. Answers from memory: the core asks it inside actor start-up.
pub struct DbPolicySource {
    schema: Schema,
    select: SqlStr,
    stored: DashMap<ActionRef, StoredPolicy>,
    fallback: Arc<dyn PolicySource>,
    /// Held by a poll from its read to its last `set_policy`, and by [`DbPolicyStore`] from
    /// its write to its `set_policy`: without it a poll that read the table just before a PUT
    /// committed would put the old policy back over the new one until the next poll.
    apply_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for DbPolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbPolicySource")
            .field("schema", &self.schema)
            .field("actions", &self.stored.len())
            .finish()
    }
}

impl PolicySource for DbPolicySource {
    fn policy_for(&self, action: &ActionRef) -> ActionPolicy {
        let fallback = self.fallback.policy_for(action);
        match self.stored.get(action) {
            Some(stored) => stored.over(fallback),
            None => fallback,
        }
    }
}

impl DbPolicySource {
    pub fn new(schema: &Schema, fallback: Arc<dyn PolicySource>) -> Self {
        Self {
            schema: schema.clone(),
            select: schema.sql(
                "SELECT ref, enabled, concurrency_limit, rate_limit_max, rate_limit_per_seconds, \
                 policy_pinned FROM {s}.action",
            ),
            stored: DashMap::new(),
            fallback,
            apply_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads the table without telling any executor: before the executor starts, so that
    /// actors start with the stored policies. Returns the number of actions read.
    pub async fn load(&self, pool: &PgPool) -> Result<usize, DbError> {
        let rows = self.read(pool).await?;
        let n = rows.len();
        self.stored.clear();
        for (action, stored) in rows {
            if let Some(stored) = stored {
                self.stored.insert(action, stored);
            }
        }
        Ok(n)
    }

    /// What the table said for an action at the last read.
    pub fn stored(&self, action: &ActionRef) -> Option<StoredPolicy> {
        self.stored.get(action).map(|s| *s)
    }

    /// Reads the table once and makes `executor` agree with it: every action whose row gives
    /// another policy than the one in force gets the row's. Returns the policies it set.
    pub async fn refresh(
        &self,
        pool: &PgPool,
        executor: &Executor,
    ) -> Result<Vec<(ActionRef, ActionPolicy)>, DbError> {
        let _in_step = self.apply_lock.lock().await;
        // Bounded, because a `PUT …/policy` waits for this lock: a hung Postgres must not hang
        // the operator's call too.
        let rows = tokio::time::timeout(STEP_TIMEOUT, self.read(pool))
            .await
            .map_err(|_| DbError::TimedOut {
                context: "reading the action table",
                after: STEP_TIMEOUT,
            })??;
        let mut applied = Vec::new();
        let mut seen = HashSet::with_capacity(rows.len());
        for (action, stored) in rows {
            seen.insert(action.clone());
            let Some(stored) = stored else {
                continue;
            };
            let policy = stored.over(self.fallback.policy_for(&action));
            // A row seen for the first time (the ledger just created it with defaults) usually
            // says what the executor already does; only a real difference is worth a message.
            if executor.policy(&action) != policy {
                executor.set_policy(&action, policy)?;
                applied.push((action.clone(), policy));
            }
            self.stored.insert(action, stored);
        }
        // A deleted row hands the action back to the configuration.
        let gone: Vec<ActionRef> = self
            .stored
            .iter()
            .filter(|e| !seen.contains(e.key()))
            .map(|e| e.key().clone())
            .collect();
        for action in gone {
            self.stored.remove(&action);
            let policy = self.fallback.policy_for(&action);
            if executor.policy(&action) != policy {
                executor.set_policy(&action, policy)?;
                applied.push((action, policy));
            }
        }
        Ok(applied)
    }

    /// Polls the table every `interval` until stopped.
    pub fn spawn_poller(
        self: &Arc<Self>,
        pool: PgPool,
        executor: Arc<Executor>,
        interval: Duration,
    ) -> Worker {
        let source = self.clone();
        Worker::spawn("policy poller", move |mut stop| async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stop => return,
                    _ = tick.tick() => {}
                }
                match source.refresh(&pool, &executor).await {
                    Ok(applied) => {
                        failing = false;
                        for (action, policy) in applied {
                            tracing::info!(action = %action, enabled = policy.enabled,
                                concurrency_limit = policy.concurrency_limit.get(),
                                "policy changed in the action table; applied");
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "reading action policies failed; will retry");
                        }
                        failing = true;
                    }
                }
            }
        })
    }

    /// Every row; `None` for a row whose policy columns are unusable.
    async fn read(&self, pool: &PgPool) -> Result<Vec<(ActionRef, Option<StoredPolicy>)>, DbError> {
        let rows = sqlx::query(self.select.clone())
            .fetch_all(pool)
            .await
            .map_err(DbError::query("reading action policies"))?;
        Ok(rows.iter().filter_map(stored_policy).collect())
    }
}

/// Reads one row's policy. A row the executor cannot use is skipped with a warning: a ref that
/// breaks the rule names no action it runs, and a value the CHECK constraints should have kept
/// out (`None` here) leaves the action's current policy alone.
fn stored_policy(row: &PgRow) -> Option<(ActionRef, Option<StoredPolicy>)> {
    let name: String = row.try_get("ref").ok()?;
    let action = match ActionRef::parse(&name) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(action = %name, error = %e, "action row with an unusable ref ignored");
            return None;
        }
    };
    let read = || -> Result<StoredPolicy, String> {
        let enabled: bool = row.try_get("enabled").map_err(|e| e.to_string())?;
        let limit: Option<i32> = row
            .try_get("concurrency_limit")
            .map_err(|e| e.to_string())?;
        let max: Option<i32> = row.try_get("rate_limit_max").map_err(|e| e.to_string())?;
        let per: Option<i32> = row
            .try_get("rate_limit_per_seconds")
            .map_err(|e| e.to_string())?;
        let positive = |v: i32, what: &str| {
            u32::try_from(v)
                .ok()
                .and_then(NonZeroU32::new)
                .ok_or_else(|| format!("{what} must be positive, is {v}"))
        };
        let concurrency_limit = limit
            .map(|l| positive(l, "concurrency_limit"))
            .transpose()?;
        let rate_limit = match (max, per) {
            (Some(max), Some(per)) => Some(RateLimit {
                max: positive(max, "rate_limit_max")?,
                per: Duration::from_secs(u64::from(positive(per, "rate_limit_per_seconds")?.get())),
            }),
            (None, None) => None,
            _ => return Err("rate_limit_max and rate_limit_per_seconds go together".to_owned()),
        };
        let pinned: bool = row.try_get("policy_pinned").map_err(|e| e.to_string())?;
        Ok(StoredPolicy {
            enabled,
            concurrency_limit,
            rate_limit,
            pinned,
        })
    };
    match read() {
        Ok(stored) => Some((action, Some(stored))),
        Err(reason) => {
            tracing::warn!(action = %action, %reason, "action row with an unusable policy ignored");
            Some((action, None))
        }
    }
}

/// Writes policies set with `PUT /api/v1/actions/{ref}/policy` to the `action` table as a
/// pinned row (see the module docs), then applies them, under the poller's lock so that the
/// poller and the API never undo each other. The row is created if the action has none yet.
///
/// A change of some fields is merged, in one transaction, into the policy the row gives now
/// (the row locked from the read to the write): the table, not the executor, is the one truth,
/// so an operator's `UPDATE` the poller has not applied yet is kept, and two changes at once,
/// from this instance or another, each see the other's fields.
pub struct DbPolicyStore {
    /// The service's pool.
    pool: PgPool,
    /// The poller's source: its lock, its fallback, and its last read, updated with what was
    /// written.
    source: Arc<DbPolicySource>,
    /// Creates the action's row if it has none (a bare row says what the configuration
    /// says), so that the next statement has a row to lock.
    create: SqlStr,
    /// Reads the row's policy and locks it until the transaction ends.
    lock_row: SqlStr,
    /// Writes the merged policy as the whole of a pinned row.
    write: SqlStr,
}

impl std::fmt::Debug for DbPolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbPolicyStore")
            .field("source", &self.source)
            .finish()
    }
}

impl DbPolicyStore {
    pub fn new(pool: PgPool, schema: &Schema, source: Arc<DbPolicySource>) -> Self {
        Self {
            pool,
            source,
            // An INSERT that conflicts burns a BIGSERIAL value; one per policy change is
            // nothing, and ON CONFLICT cannot lose a race with the ledger creating the row.
            create: schema
                .sql("INSERT INTO {s}.action (ref) VALUES ($1) ON CONFLICT (ref) DO NOTHING"),
            lock_row: schema.sql(
                "SELECT ref, enabled, concurrency_limit, rate_limit_max, rate_limit_per_seconds, \
                 policy_pinned FROM {s}.action WHERE ref = $1 FOR UPDATE",
            ),
            write: schema.sql(
                "UPDATE {s}.action SET enabled = $2, concurrency_limit = $3, \
                   rate_limit_max = $4, rate_limit_per_seconds = $5, policy_pinned = true \
                 WHERE ref = $1",
            ),
        }
    }

    /// The INT columns' values of a policy; refused if one does not fit.
    fn columns(policy: &ActionPolicy) -> Result<(i32, Option<i32>, Option<i32>), HookError> {
        // The HTTP edge refuses values the INT columns cannot hold; refusing again here keeps
        // a caller that skipped that check from storing a wrapped-around limit.
        let int = |v: u64, what: &str| {
            i32::try_from(v).map_err(|_| HookError(format!("{what} {v} is too large to store")))
        };
        let limit = int(
            u64::from(policy.concurrency_limit.get()),
            "concurrency_limit",
        )?;
        let (max, per) = match policy.rate_limit {
            Some(r) => (
                Some(int(u64::from(r.max.get()), "rate_limit.max")?),
                Some(int(r.per.as_secs(), "rate_limit.per_seconds")?),
            ),
            None => (None, None),
        };
        Ok((limit, max, per))
    }

    /// In one transaction: makes sure the row exists, locks and reads it, merges `patch` into
    /// the policy it gives, writes the result as a pinned row. Returns the merged policy.
    async fn merge_and_store(
        &self,
        executor: &Executor,
        action: &ActionRef,
        patch: PolicyPatch,
    ) -> Result<ActionPolicy, HookError> {
        let failed = |e: sqlx::Error| HookError(DbError::query("storing a policy")(e).to_string());
        let mut tx = self.pool.begin().await.map_err(failed)?;
        sqlx::query(self.create.clone())
            .bind(action.as_str())
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        let row = sqlx::query(self.lock_row.clone())
            .bind(action.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(failed)?;
        let fallback = self.source.fallback.policy_for(action);
        let current = match stored_policy(&row) {
            Some((_, Some(stored))) => stored.over(fallback),
            // A row the executor cannot read (it warned): what is in force here is the best
            // knowledge of the action's policy.
            _ => executor.policy(action),
        };
        let policy = patch.over(current);
        // Refused here, the transaction rolls back: not even the bare row stays.
        let (limit, max, per) = Self::columns(&policy)?;
        sqlx::query(self.write.clone())
            .bind(action.as_str())
            .bind(policy.enabled)
            .bind(limit)
            .bind(max)
            .bind(per)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        Ok(policy)
    }

    async fn store_and_apply(
        &self,
        executor: &Executor,
        action: &ActionRef,
        patch: PolicyPatch,
    ) -> Result<ActionPolicy, HookError> {
        let stored = tokio::time::timeout(STEP_TIMEOUT, async {
            let in_step = self.source.apply_lock.lock().await;
            self.merge_and_store(executor, action, patch)
                .await
                .map(|policy| (in_step, policy))
        })
        .await;
        let (_in_step, policy) = match stored {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(HookError(format!(
                    "storing a policy: Postgres did not answer within {STEP_TIMEOUT:?}; the \
                     policy in force is unchanged, the row may or may not have been written \
                     (the table's poller applies it if it was)"
                )));
            }
        };
        self.source.stored.insert(
            action.clone(),
            StoredPolicy {
                enabled: policy.enabled,
                concurrency_limit: Some(policy.concurrency_limit),
                rate_limit: policy.rate_limit,
                pinned: true,
            },
        );
        executor
            .set_policy(action, policy)
            .map_err(|e| HookError(e.to_string()))?;
        Ok(policy)
    }
}

impl PolicyStore for DbPolicyStore {
    fn apply<'a>(
        &'a self,
        executor: &'a Executor,
        action: &'a ActionRef,
        patch: PolicyPatch,
    ) -> BoxFuture<'a, Result<ActionPolicy, HookError>> {
        Box::pin(self.store_and_apply(executor, action, patch))
    }

    /// The table's last read over the configuration now in force, for every action, as at
    /// start: a pinned row (set over HTTP) keeps its whole policy, another row's columns
    /// keep theirs and the configuration fills in the rest. Under the poller's lock, so a
    /// `PUT …/policy` in flight is applied after this, not undone by it.
    fn reconcile<'a>(&'a self, executor: &'a Executor) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin(async move {
            let _in_step = tokio::time::timeout(STEP_TIMEOUT, self.source.apply_lock.lock())
                .await
                .map_err(|_| {
                    HookError(format!(
                        "the action table's poller held its lock for over {STEP_TIMEOUT:?}; \
                         the reloaded policies apply with its next poll"
                    ))
                })?;
            executor.follow_policy_source(false);
            Ok(())
        })
    }
}
