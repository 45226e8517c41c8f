//! The consumers in `cluster.mode: shared`: what is handled here and what is carried to the
//! partition queue of its action's owner ([`partitions`](super::partitions) tells the
//! whole scheme). Without a router (`cluster.mode: single`) every function here hands the
//! batch straight to [`consumers`](super::consumers).

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;

use super::acks::Acks;
use super::consumers::{self, ConsumerContext, Handled};
use super::partitions::{Kind, Router};
use super::wire;
use crate::cluster::Partition;
use crate::model::ExecutionId;

/// Requests from the shared intake queue.
pub fn handle_requests(ctx: &Arc<ConsumerContext>, batch: Vec<Delivery>, acks: &Acks) -> Handled {
    let Some(router) = ctx.router.clone() else {
        return consumers::handle_requests(ctx, batch, acks);
    };
    let mut here = Vec::with_capacity(batch.len());
    for d in batch {
        match peek_action(&d.data).map(|a| router.partition_of(&a)) {
            Some(p) if !router.handles_here(p) => {
                router.forward(&ctx.publisher, acks, d, p, Kind::Request);
            }
            // Owned, or not readable: refused here as anything malformed is.
            _ => here.push(d),
        }
    }
    consumers::handle_requests(ctx, here, acks)
}

/// Completions from the shared queue.
pub fn handle_completions(
    ctx: &Arc<ConsumerContext>,
    batch: Vec<Delivery>,
    acks: &Acks,
) -> Handled {
    by_execution(ctx, batch, acks, Kind::Completion)
}

/// Cancels from the shared queue.
pub fn handle_cancels(ctx: &Arc<ConsumerContext>, batch: Vec<Delivery>, acks: &Acks) -> Handled {
    by_execution(ctx, batch, acks, Kind::Cancel)
}

/// The action a request body names, if it can be read (without reading the rest).
fn peek_action(body: &[u8]) -> Option<crate::model::ActionRef> {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(borrow)]
        action_ref: Option<std::borrow::Cow<'a, str>>,
    }
    let peek: Peek<'_> = serde_json::from_slice(body).ok()?;
    crate::model::ActionRef::parse(peek.action_ref.as_deref()?).ok()
}

/// Completions or cancels: those whose execution is live here are handled here; the others
/// find their action in the ledger and go to its partition (or stay here when the ledger
/// does not know them either).
fn by_execution(
    ctx: &Arc<ConsumerContext>,
    batch: Vec<Delivery>,
    acks: &Acks,
    kind: Kind,
) -> Handled {
    let here_fn = match kind {
        Kind::Cancel => consumers::handle_cancels,
        _ => consumers::handle_completions,
    };
    let Some(router) = ctx.router.clone() else {
        return here_fn(ctx, batch, acks);
    };
    let mut here = Vec::new();
    let mut elsewhere: Vec<(ExecutionId, Delivery)> = Vec::new();
    for d in batch {
        match execution_of(&d, kind) {
            Some(id) if !ctx.executor.is_live(id) => elsewhere.push((id, d)),
            _ => here.push(d),
        }
    }
    if elsewhere.is_empty() {
        return here_fn(ctx, here, acks);
    }
    let ctx = ctx.clone();
    let acks = acks.clone();
    Box::pin(async move {
        let ids: Vec<ExecutionId> = elsewhere.iter().map(|(id, _)| *id).collect();
        let found: std::collections::HashMap<ExecutionId, crate::model::ActionRef> =
            locate(&router, ids).await.into_iter().collect();
        for (id, d) in elsewhere {
            match found.get(&id).map(|a| router.partition_of(a)) {
                // Taken over meanwhile (or live now): here after all.
                Some(p) if !router.owner.owns(p) && !ctx.executor.is_live(id) => {
                    router.forward(&ctx.publisher, &acks, d, p, kind);
                }
                // A cancel before its request: whichever instance will own the request must
                // know it, and nobody can tell which action it is for yet.
                None if kind == Kind::Cancel && !ctx.executor.is_live(id) => {
                    router.broadcast(&ctx.publisher, &acks, d, kind);
                }
                _ => here.push(d),
            }
        }
        here_fn(&ctx, here, &acks).await;
    })
}

/// The execution a completion or cancel names, if its body can be read.
fn execution_of(d: &Delivery, kind: Kind) -> Option<ExecutionId> {
    let content_type = consumers::content_type(d);
    match kind {
        Kind::Cancel => wire::decode_cancel(&d.data, content_type, usize::MAX)
            .ok()
            .map(|c| c.execution_id),
        _ => wire::decode_completion(&d.data, content_type, usize::MAX)
            .ok()
            .map(|c| c.execution_id),
    }
}

/// Pauses between failed lookups, from the first to the last, doubling.
const LOCATE_RETRY: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(5));

/// The actions of `ids`, asking again until the ledger answers: the messages stay with the
/// broker meanwhile.
async fn locate(
    router: &Router,
    ids: Vec<ExecutionId>,
) -> Vec<(ExecutionId, crate::model::ActionRef)> {
    let mut pause = LOCATE_RETRY.0;
    let mut failures = 0u32;
    loop {
        match router.owner.locate(ids.clone()).await {
            Ok(found) => return found,
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(error = %e, ids = ids.len(),
                        "cannot find whose completions or cancels these are; they wait");
                }
                failures += 1;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LOCATE_RETRY.1);
            }
        }
    }
}

/// Everything that came on partition `p`'s queue: the partition is taken first if it is not
/// owned yet (this instance was just made the queue's active consumer); then each run of
/// messages of one kind is handled in the order they came.
pub fn handle_partition(
    ctx: &Arc<ConsumerContext>,
    p: Partition,
    batch: Vec<Delivery>,
    acks: &Acks,
) -> Handled {
    let ctx = ctx.clone();
    let acks = acks.clone();
    Box::pin(async move {
        let Some(router) = ctx.router.clone() else {
            return;
        };
        if !ctx.executor.is_accepting() {
            // Stopping: held unhandled until the connection closes and gives them to the
            // partition's next owner (requeued now, they would come straight back here).
            return;
        }
        if !router.owner.owns(p) {
            if !router.owner.clone().take(p).await {
                // Stopping or fenced: nothing from this queue is handled; the broker gets it
                // all back when the session closes.
                return;
            }
            // Requests carried here before (by anyone) come first (see `partitions`).
            router.mark(&ctx.publisher, p);
        }
        let mut runs: Vec<(Kind, Vec<Delivery>)> = Vec::new();
        for d in batch {
            let kind = Kind::of(&d.properties);
            match runs.last_mut() {
                Some((k, run)) if *k == kind => run.push(d),
                _ => runs.push((kind, vec![d])),
            }
        }
        for (kind, run) in runs {
            let stamps: Vec<(u64, u64)> = run
                .iter()
                .filter_map(|d| super::partitions::stamp_of(&d.properties))
                .collect();
            match kind {
                Kind::Tick => {
                    for d in run {
                        acks.ack(d.delivery_tag);
                    }
                }
                Kind::Request => consumers::handle_requests(&ctx, run, &acks).await,
                Kind::Completion => consumers::handle_completions(&ctx, run, &acks).await,
                Kind::Cancel => consumers::handle_cancels(&ctx, run, &acks).await,
            }
            // Submitted (the handlers' futures end once they are): a request of this
            // partition taken from the shared queue may be handled here after these.
            router.came_back(p, &stamps);
        }
    })
}

/// The leader queue (only ticks): this instance was made its active consumer, so it becomes
/// the intake leader.
pub fn handle_leader(ctx: &Arc<ConsumerContext>, batch: Vec<Delivery>, acks: &Acks) -> Handled {
    for d in &batch {
        acks.ack(d.delivery_tag);
    }
    if let Some(router) = &ctx.router
        && ctx.executor.is_accepting()
    {
        router.lead(&ctx.publisher);
    }
    consumers::done()
}
