//! What one flush writes: the pending items folded into one row change per execution, the
//! column arrays they are bound as, and the SQL that writes them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::SqlStr;

use crate::core::ports::RemovalReason;
use crate::core::{Dispatch, Dispatcher, Event};
use crate::db::{Schema, db_id, jsonb_text, pg_text};
use crate::model::{ActionRef, ExecutionId};

/// One unit of pending work.
pub(super) enum Item {
    /// `created` is set for acceptances only; see the writer's `Inbox::created_for`.
    Event {
        event: Event,
        created: Option<DateTime<Utc>>,
    },
    Running {
        id: ExecutionId,
        at: DateTime<Utc>,
    },
    /// Released once the batch that holds this item has committed.
    Dispatches {
        /// One handler's dispatches, in FIFO order.
        batch: Vec<Dispatch>,
        /// The dispatcher they were meant for.
        to: Arc<dyn Dispatcher>,
    },
}

impl Item {
    /// The execution a row change is about; `None` for held dispatches, which write nothing.
    pub(super) fn execution_id(&self) -> Option<ExecutionId> {
        match self {
            Item::Event { event, .. } => Some(event.execution_id()),
            Item::Running { id, .. } => Some(*id),
            Item::Dispatches { .. } => None,
        }
    }
}

/// The statements of one flush, built once with the schema in them.
pub(super) struct Statements {
    pub(super) insert: SqlStr,
    pub(super) update: SqlStr,
    /// Both in one statement (the two touch different rows): one round trip, one implicit
    /// transaction, for a flush that has new and earlier executions alike.
    pub(super) both: SqlStr,
    /// Keeps cancels that came before their requests, the newest `$2` at most.
    pub(super) mark: SqlStr,
    /// Forgets the marks of executions canceled.
    pub(super) unmark: SqlStr,
}

/// `status` ranked by how far an execution has come, as SQL; a write only ever raises it.
const RANK_OF_STATUS: &str = "CASE e.status WHEN 'requested' THEN 0 WHEN 'scheduled' THEN 1 \
                              WHEN 'running' THEN 2 ELSE 3 END";

impl Statements {
    pub(super) fn new(schema: &Schema) -> Self {
        // Data-modifying CTEs run exactly once each, and the two never touch the same row: a
        // flush writes each execution once, INSERTed if it was accepted in this flush and
        // UPDATEd otherwise. The UPDATE's parameters follow the INSERT's eleven.
        let both = schema.sql(&format!(
            "WITH inserted AS ({}), updated AS ({}) SELECT 1",
            Self::insert_template(),
            Self::update_template(12)
        ));
        Self {
            insert: schema.sql(&Self::insert_template()),
            update: schema.sql(&Self::update_template(1)),
            both,
            // The DELETE sees the table as it was before the INSERT (one snapshot): the bound
            // may be passed by one batch until the next one trims it.
            mark: schema.sql(
                "WITH added AS (INSERT INTO {s}.cancel_ahead (execution_id) \
                                SELECT unnest($1::int8[]) ON CONFLICT DO NOTHING) \
                 DELETE FROM {s}.cancel_ahead WHERE recorded < \
                   (SELECT recorded FROM {s}.cancel_ahead ORDER BY recorded DESC \
                    OFFSET $2 LIMIT 1)",
            ),
            unmark: schema.sql("DELETE FROM {s}.cancel_ahead WHERE execution_id = ANY($1::int8[])"),
        }
    }

    /// New executions, already in the state they reached within the batch. ORDER BY the
    /// array position: the identity default (accept_seq) is evaluated above the sort, so
    /// acceptance order within a batch is the order of the rows. A conflict (an id accepted
    /// again) only moves the existing row forward. Parameters $1 to $11.
    fn insert_template() -> String {
        format!(
            "INSERT INTO {{s}}.execution AS e \
               (id, action, status, created, updated, request_id, parameters, enqueued_at, \
                dispatched_at, attempt, result) \
             SELECT u.id, u.action, u.status, u.created, u.updated, u.request_id, \
                    u.parameters::jsonb, u.enqueued_at, u.dispatched_at, u.attempt, \
                    u.result::jsonb \
             FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::timestamptz[], \
                         $5::timestamptz[], $6::text[], $7::text[], $8::timestamptz[], \
                         $9::timestamptz[], $10::int4[], $11::text[]) \
                  WITH ORDINALITY \
                  AS u(id, action, status, created, updated, request_id, parameters, \
                       enqueued_at, dispatched_at, attempt, result, ord) \
             ORDER BY u.ord \
             ON CONFLICT (id) DO UPDATE SET \
               status = EXCLUDED.status, updated = EXCLUDED.updated, \
               dispatched_at = COALESCE(EXCLUDED.dispatched_at, e.dispatched_at), \
               attempt = e.attempt + EXCLUDED.attempt, \
               result = COALESCE(EXCLUDED.result, e.result) \
             WHERE {RANK_OF_STATUS} < \
               CASE EXCLUDED.status WHEN 'requested' THEN 0 WHEN 'scheduled' THEN 1 \
               WHEN 'running' THEN 2 ELSE 3 END"
        )
    }

    /// Executions accepted in an earlier batch: one UPDATE for all of them, each row moved
    /// straight to the state it reached in this batch: further than it was, or (`back`)
    /// from `scheduled` or `running` back to waiting when its dispatch came back unrouted.
    /// Nine parameters, numbered from `first`.
    fn update_template(first: usize) -> String {
        let p: Vec<String> = (first..first + 9).map(|n| format!("${n}")).collect();
        format!(
            "UPDATE {{s}}.execution e SET \
               status = u.status, updated = u.updated, \
               dispatched_at = CASE WHEN u.back AND u.dispatched_at IS NULL THEN NULL \
                               ELSE COALESCE(u.dispatched_at, e.dispatched_at) END, \
               attempt = GREATEST(e.attempt + u.admissions, u.min_attempt), \
               result = COALESCE(u.result::jsonb, e.result) \
             FROM UNNEST({}::int8[], {}::text[], {}::timestamptz[], {}::timestamptz[], \
                         {}::int4[], {}::int4[], {}::text[], {}::int4[], {}::bool[]) \
                  AS u(id, status, updated, dispatched_at, admissions, min_attempt, \
                       result, rank, back) \
             WHERE e.id = u.id AND ({RANK_OF_STATUS} < u.rank \
               OR (u.back AND e.status IN ('scheduled', 'running')))",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]
        )
    }
}

/// How far an execution has come; a row is only ever moved to a higher rank.
fn rank(status: &str) -> i32 {
    match status {
        "requested" => 0,
        "scheduled" => 1,
        "running" => 2,
        _ => 3,
    }
}

/// An acceptance: what only the INSERT needs.
pub(super) struct Accept<'a> {
    pub(super) action: &'a ActionRef,
    pub(super) request_id: Option<Cow<'a, str>>,
    pub(super) parameters: Cow<'a, str>,
    pub(super) enqueued_at: DateTime<Utc>,
    pub(super) created: DateTime<Utc>,
}

/// Everything one batch does to one execution, folded into the state it ends in.
pub(super) struct RowChange<'a> {
    pub(super) id: i64,
    pub(super) accept: Option<Accept<'a>>,
    pub(super) status: &'static str,
    /// When the status last changed.
    pub(super) updated: DateTime<Utc>,
    pub(super) dispatched_at: Option<DateTime<Utc>>,
    pub(super) admissions: i32,
    pub(super) result: Option<String>,
    /// Its dispatch came back unrouted in this batch: the row may move back to waiting.
    back: bool,
}

impl RowChange<'_> {
    /// Applies one transition if it moves the execution forward. Admissions are counted even
    /// when a `running` confirmation overtook them.
    fn advance(&mut self, status: &'static str, at: DateTime<Utc>, result: Option<String>) {
        if rank(status) > rank(self.status) {
            self.status = status;
            self.updated = at;
            if result.is_some() {
                self.result = result;
            }
        }
    }

    /// `attempt` at least 1 once the broker confirmed a dispatch.
    pub(super) fn min_attempt(&self) -> i32 {
        i32::from(self.status == "running")
    }
}

/// The rows one flush writes: one change per execution, in order of first appearance (for new
/// executions that is acceptance order).
#[derive(Default)]
pub(super) struct Plan<'a> {
    pub(super) rows: Vec<RowChange<'a>>,
    index: HashMap<i64, usize>,
    /// Ids whose cancel came before their request: kept in `cancel_ahead`.
    pub(super) marks: Vec<i64>,
    /// Ids canceled in this batch: a mark they had is used up.
    pub(super) unmarks: Vec<i64>,
}

impl<'a> Plan<'a> {
    /// Built before any await: events are not `Sync` (their receipts are not), so a future
    /// that held references to them could not move between threads; the plan holds only
    /// references to their plain fields.
    pub(super) fn build(items: impl IntoIterator<Item = &'a Item>) -> Self {
        let mut p = Plan::default();
        for item in items {
            // Ids beyond BIGINT were counted as dropped when the batch arrived; held dispatches
            // write nothing.
            let Some(id) = item.execution_id().and_then(db_id) else {
                continue;
            };
            match item {
                Item::Running { at, .. } => {
                    // `dispatched_at` stays the admission time. The broker's confirm can come
                    // after the worker has already finished and the next execution was
                    // admitted, so writing the confirm time here would make the ledger show
                    // FIFO order broken when it was not.
                    let row = p.row(id, *at);
                    row.advance("running", *at, None);
                }
                Item::Event { event, created } => p.add_event(id, event, *created),
                Item::Dispatches { .. } => {}
            }
        }
        p
    }

    /// The change of an execution, started as `requested` at `at` if it is new to the batch.
    fn row(&mut self, id: i64, at: DateTime<Utc>) -> &mut RowChange<'a> {
        let slot = *self.index.entry(id).or_insert_with(|| {
            self.rows.push(RowChange {
                id,
                accept: None,
                status: "requested",
                updated: at,
                dispatched_at: None,
                admissions: 0,
                result: None,
                back: false,
            });
            self.rows.len() - 1
        });
        &mut self.rows[slot]
    }

    fn add_event(&mut self, id: i64, event: &'a Event, created: Option<DateTime<Utc>>) {
        match event {
            Event::Accepted {
                action,
                request_id,
                payload,
                enqueued_at,
                ..
            } => {
                let row = self.row(id, *enqueued_at);
                row.accept = Some(Accept {
                    action,
                    request_id: request_id.as_deref().map(pg_text),
                    parameters: jsonb_text(payload.json()),
                    enqueued_at: *enqueued_at,
                    created: created.unwrap_or(*enqueued_at),
                });
            }
            Event::Admitted { at, .. } => {
                let row = self.row(id, *at);
                row.admissions += 1;
                row.dispatched_at = Some(*at);
                row.advance("scheduled", *at, None);
            }
            Event::Returned { at, .. } => {
                let row = self.row(id, *at);
                row.admissions -= 1;
                row.dispatched_at = None;
                row.status = "requested";
                row.updated = *at;
                row.back = true;
            }
            Event::Completed {
                status, result, at, ..
            } => {
                let result = result.as_ref().map(|r| jsonb_text(r.json()).into_owned());
                self.row(id, *at).advance(status.as_str(), *at, result);
            }
            Event::CanceledAhead { .. } => self.marks.push(id),
            Event::Removed {
                reason, execution, ..
            } => {
                if *reason == RemovalReason::Canceled {
                    self.unmarks.push(id);
                }
                let at = plus(execution.enqueued_at, execution.waited);
                let waited = execution.waited.as_secs_f64();
                let (status, result) = match reason {
                    RemovalReason::Canceled => ("canceled", None),
                    RemovalReason::TimedOut => (
                        "timeout",
                        Some(serde_json::json!({
                            "error": format!(
                                "QueueTimeout: waited {waited:.0}s in the queue without a slot"
                            ),
                            "error_class": "QueueTimeout",
                            "waited_seconds": waited,
                        })),
                    ),
                    RemovalReason::Purged => (
                        "timeout",
                        Some(serde_json::json!({
                            "error": format!(
                                "Purged: waited {waited:.0}s in the queue, longer than the purge allows"
                            ),
                            "error_class": "Purged",
                            "waited_seconds": waited,
                        })),
                    ),
                    RemovalReason::NoRoute => (
                        "timeout",
                        Some(serde_json::json!({
                            "error": "NoRoute: its dispatches found no worker queue for longer \
                                      than executor.queue.no_route_timeout_seconds",
                            "error_class": "NoRoute",
                            "waited_seconds": waited,
                        })),
                    ),
                };
                self.row(id, at)
                    .advance(status, at, result.map(|r| r.to_string()));
            }
            Event::Reclaimed {
                admitted_at,
                running_for,
                ..
            } => {
                let secs = running_for.as_secs_f64();
                let result = serde_json::json!({
                    "error": format!(
                        "LostCompletion: no completion {secs:.0}s after dispatch; \
                         the slot was reclaimed"
                    ),
                    "error_class": "LostCompletion",
                    "running_seconds": secs,
                });
                let at = plus(*admitted_at, *running_for);
                self.row(id, at)
                    .advance("failed", at, Some(result.to_string()));
            }
            Event::Rejected { .. } | Event::Unmatched { .. } => {}
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.marks.is_empty() && self.unmarks.is_empty()
    }

    pub(super) fn new_actions(&self) -> impl Iterator<Item = &'a ActionRef> + '_ {
        self.rows
            .iter()
            .filter_map(|r| r.accept.as_ref().map(|a| a.action))
    }
}

fn plus(at: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| at.checked_add_signed(d))
        .unwrap_or(at)
}

/// The INSERT's column arrays.
pub(super) struct InsertColumns<'r> {
    pub(super) id: Vec<i64>,
    pub(super) action: Vec<i64>,
    pub(super) status: Vec<&'static str>,
    pub(super) created: Vec<DateTime<Utc>>,
    pub(super) updated: Vec<DateTime<Utc>>,
    pub(super) request_id: Vec<Option<&'r str>>,
    pub(super) parameters: Vec<&'r str>,
    pub(super) enqueued_at: Vec<DateTime<Utc>>,
    pub(super) dispatched_at: Vec<Option<DateTime<Utc>>>,
    pub(super) attempt: Vec<i32>,
    pub(super) result: Vec<Option<&'r str>>,
}

impl InsertColumns<'_> {
    pub(super) fn with_capacity(n: usize) -> Self {
        Self {
            id: Vec::with_capacity(n),
            action: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
            created: Vec::with_capacity(n),
            updated: Vec::with_capacity(n),
            request_id: Vec::with_capacity(n),
            parameters: Vec::with_capacity(n),
            enqueued_at: Vec::with_capacity(n),
            dispatched_at: Vec::with_capacity(n),
            attempt: Vec::with_capacity(n),
            result: Vec::with_capacity(n),
        }
    }
}

/// The UPDATE's column arrays.
pub(super) struct UpdateColumns<'r> {
    pub(super) id: Vec<i64>,
    pub(super) status: Vec<&'static str>,
    pub(super) updated: Vec<DateTime<Utc>>,
    pub(super) dispatched_at: Vec<Option<DateTime<Utc>>>,
    pub(super) admissions: Vec<i32>,
    pub(super) min_attempt: Vec<i32>,
    pub(super) result: Vec<Option<&'r str>>,
    pub(super) rank: Vec<i32>,
    pub(super) back: Vec<bool>,
}

impl<'r> UpdateColumns<'r> {
    pub(super) fn of(rows: &[&'r RowChange<'_>]) -> Self {
        Self {
            id: rows.iter().map(|r| r.id).collect(),
            status: rows.iter().map(|r| r.status).collect(),
            updated: rows.iter().map(|r| r.updated).collect(),
            dispatched_at: rows.iter().map(|r| r.dispatched_at).collect(),
            admissions: rows.iter().map(|r| r.admissions).collect(),
            min_attempt: rows.iter().map(|r| r.min_attempt()).collect(),
            result: rows.iter().map(|r| r.result.as_deref()).collect(),
            rank: rows.iter().map(|r| rank(r.status)).collect(),
            back: rows.iter().map(|r| r.back).collect(),
        }
    }
}

/// Splits a batch into one plan per execution, in the order the executions first appear;
/// each entry says how many items it covers.
pub(super) fn plans_per_execution(batch: &[Item]) -> Vec<(ExecutionId, usize, Plan<'_>)> {
    let mut order: Vec<ExecutionId> = Vec::new();
    let mut members: HashMap<ExecutionId, Vec<&Item>> = HashMap::new();
    for item in batch {
        let Some(id) = item.execution_id() else {
            continue;
        };
        members
            .entry(id)
            .or_insert_with(|| {
                order.push(id);
                Vec::new()
            })
            .push(item);
    }
    order
        .iter()
        .filter_map(|id| members.remove(id).map(|m| (*id, m.len(), Plan::build(m))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndStatus, Payload};

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).expect("valid time")
    }

    fn event(e: Event) -> Item {
        Item::Event {
            event: e,
            created: None,
        }
    }

    #[test]
    fn a_whole_lifecycle_in_one_batch_is_one_row_in_its_final_state() {
        let a = ActionRef::parse("core.x").expect("valid");
        let items = vec![
            event(Event::Accepted {
                action: a.clone(),
                execution_id: 7,
                request_id: None,
                payload: Payload::empty_object(),
                enqueued_at: at(0),
                receipt: None,
            }),
            event(Event::Admitted {
                action: a.clone(),
                execution_id: 7,
                at: at(1),
                waited: Duration::from_millis(1),
            }),
            Item::Running { id: 7, at: at(2) },
            event(Event::Completed {
                action: a,
                execution_id: 7,
                status: EndStatus::Failed,
                result: Some(Payload::from_json(r#"{"code": 1}"#).expect("json")),
                at: at(3),
                receipt: None,
                from_waiting: false,
            }),
        ];
        let plan = Plan::build(&items);
        assert_eq!(plan.rows.len(), 1);
        let row = &plan.rows[0];
        assert!(row.accept.is_some());
        assert_eq!(row.status, "failed");
        assert_eq!(row.updated, at(3));
        assert_eq!(row.dispatched_at, Some(at(1)));
        assert_eq!(row.admissions, 1);
        assert_eq!(row.result.as_deref(), Some(r#"{"code": 1}"#));
    }

    #[test]
    fn a_confirmation_that_overtakes_its_admission_does_not_move_the_row_back() {
        let a = ActionRef::parse("core.x").expect("valid");
        let items = vec![
            Item::Running { id: 8, at: at(5) },
            event(Event::Admitted {
                action: a,
                execution_id: 8,
                at: at(4),
                waited: Duration::ZERO,
            }),
        ];
        let plan = Plan::build(&items);
        let row = &plan.rows[0];
        assert!(row.accept.is_none(), "accepted in an earlier batch");
        assert_eq!(row.status, "running");
        assert_eq!(row.updated, at(5));
        assert_eq!(row.admissions, 1);
        assert_eq!(row.min_attempt(), 1);
    }
}
