//! Turns the core's failures into dead letters: executions that timed out or were purged while
//! waiting (`queue_from: queued`) and slots reclaimed for want of a completion
//! (`queue_from: running`). Wraps the next sink and passes every event on.
//!
//! [`DlqSwitch`] is `dlq.enabled`, shared by everything that publishes or reads dead letters,
//! so that a configuration reload turns them on or off everywhere at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::publisher::{Outgoing, PublisherHandle};
use super::wire::{DeadLetter, QueueFrom};
use crate::core::ports::RemovalReason;
use crate::core::{Event, OutcomeSink};

/// `dlq.enabled`: whether failures are published to `attune.dlx` (and the DLQ is read), or
/// only logged and counted. Clones share one value.
#[derive(Debug, Clone)]
pub struct DlqSwitch(Arc<AtomicBool>);

impl DlqSwitch {
    pub fn new(on: bool) -> Self {
        Self(Arc::new(AtomicBool::new(on)))
    }

    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Turns it on or off for every clone.
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }
}

/// A switch of its own, for what is built with a fixed `dlq.enabled`.
impl From<bool> for DlqSwitch {
    fn from(on: bool) -> Self {
        Self::new(on)
    }
}

pub struct DeadLetterSink {
    publisher: PublisherHandle,
    enabled: DlqSwitch,
    inner: Arc<dyn OutcomeSink>,
}

impl DeadLetterSink {
    pub fn new(
        publisher: PublisherHandle,
        enabled: impl Into<DlqSwitch>,
        inner: Arc<dyn OutcomeSink>,
    ) -> Self {
        Self {
            publisher,
            enabled: enabled.into(),
            inner,
        }
    }

    fn letter(event: &Event) -> Option<DeadLetter> {
        match event {
            Event::Removed {
                action,
                reason:
                    reason @ (RemovalReason::TimedOut | RemovalReason::Purged | RemovalReason::NoRoute),
                execution,
                ..
            } => {
                let (class, message) = match reason {
                    RemovalReason::TimedOut => (
                        "QueueTimeout",
                        format!(
                            "waited {:.0}s in the queue (executor.queue.queue_timeout_seconds)",
                            execution.waited.as_secs_f64()
                        ),
                    ),
                    RemovalReason::NoRoute => (
                        "NoRoute",
                        format!(
                            "no worker queue is bound to {} \
                             (executor.queue.no_route_timeout_seconds)",
                            crate::rabbit::topology::dispatch_routing_key(action.as_str())
                        ),
                    ),
                    _ => (
                        "Purge",
                        format!(
                            "waited {:.0}s in the queue (purge.max_queued_age_seconds)",
                            execution.waited.as_secs_f64()
                        ),
                    ),
                };
                let original = serde_json::json!({
                    "execution_id": execution.execution_id,
                    "action_ref": action.as_str(),
                    "request_id": execution.request_id.as_deref(),
                    "parameters": &execution.payload,
                    "enqueued_at": execution.enqueued_at,
                });
                let mut letter = DeadLetter::new(QueueFrom::Queued, class, message, original);
                letter.execution_id = Some(execution.execution_id);
                letter.action_ref = Some(action.as_str().to_owned());
                letter.request_id = execution.request_id.as_deref().map(str::to_owned);
                Some(letter)
            }
            Event::Reclaimed {
                action,
                execution_id,
                request_id,
                admitted_at,
                running_for,
            } => {
                let original = serde_json::json!({
                    "execution_id": execution_id,
                    "action_ref": action.as_str(),
                    "request_id": request_id.as_deref(),
                    "dispatched_at": admitted_at,
                });
                let mut letter = DeadLetter::new(
                    QueueFrom::Running,
                    "LostCompletion",
                    format!(
                        "no completion after {:.0}s (purge.max_running_age_seconds); slot reclaimed",
                        running_for.as_secs_f64()
                    ),
                    original,
                );
                letter.execution_id = Some(*execution_id);
                letter.action_ref = Some(action.as_str().to_owned());
                letter.request_id = request_id.as_deref().map(str::to_owned);
                Some(letter)
            }
            _ => None,
        }
    }
}

impl OutcomeSink for DeadLetterSink {
    fn record(&self, events: Vec<Event>) {
        for event in &events {
            if let Some(letter) = Self::letter(event) {
                metrics::counter!(
                    "attune_dlq_messages_total",
                    "queue_from" => letter.queue_from.as_str(),
                    "error_class" => letter.error_class.clone()
                )
                .increment(1);
                if self.enabled.is_on() {
                    self.publisher.publish(Outgoing::DeadLetter(letter), None);
                } else {
                    tracing::warn!(execution_id = ?letter.execution_id, error_class = %letter.error_class, "dead letter (dlq disabled)");
                }
            }
        }
        self.inner.record(events);
    }
}
