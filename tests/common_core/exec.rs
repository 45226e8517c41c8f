//! An [`Executor`] wired to in-memory ports the tests can read: dispatches and events arrive
//! on channels, and an observer keeps the latest counters and the most executions any action
//! ever had running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fifo_executor::core::memory::ChannelDispatcher;
use fifo_executor::core::memory::ChannelSink;
use fifo_executor::core::ports::{Dispatch, Event};
use fifo_executor::core::{
    ActionPolicy, Executor, Ports, QueueSettings, QueueStats, StatsObserver, UniformPolicy,
};
use fifo_executor::model::{
    ActionRef, CancelRequest, CancelVerdict, Completion, CompletionVerdict, EndStatus, ExecutionId,
    Submission, Verdict,
};
use tokio::sync::mpsc::UnboundedReceiver;

use super::{Answer, lock, poll_until, sub};

/// Keeps, per action, the latest counters and the highest `active_count` ever reported.
#[derive(Debug, Default)]
pub struct WatchStats(Mutex<HashMap<ActionRef, (QueueStats, usize)>>);

impl StatsObserver for WatchStats {
    fn observe(&self, stats: &QueueStats) {
        let mut all = lock(&self.0);
        let peak = all
            .get(&stats.action_ref)
            .map_or(0, |(_, peak)| *peak)
            .max(stats.active_count);
        all.insert(stats.action_ref.clone(), (stats.clone(), peak));
    }
}

impl WatchStats {
    pub fn peak_active(&self, action: &ActionRef) -> usize {
        lock(&self.0).get(action).map_or(0, |(_, peak)| *peak)
    }

    pub fn latest(&self, action: &ActionRef) -> Option<QueueStats> {
        lock(&self.0).get(action).map(|(s, _)| s.clone())
    }
}

pub struct ExecRig {
    /// Shared so that simulated worker tasks can complete through it too.
    pub exec: Arc<Executor>,
    pub dispatch_rx: UnboundedReceiver<Vec<Dispatch>>,
    pub event_rx: UnboundedReceiver<Event>,
    pub watch: Arc<WatchStats>,
    /// Everything dispatched so far, in arrival order.
    pub dispatched: Vec<Dispatch>,
    /// Everything the sink recorded so far, in arrival order.
    pub events: Vec<Event>,
}

impl ExecRig {
    pub async fn start(settings: QueueSettings, policy: ActionPolicy) -> Self {
        let (dispatcher, dispatch_rx) = ChannelDispatcher::new();
        let (sink, event_rx) = ChannelSink::new();
        let watch = Arc::new(WatchStats::default());
        let ports = Ports {
            dispatcher: Arc::new(dispatcher),
            sink: Arc::new(sink),
            observer: watch.clone(),
        };
        let exec = Executor::start(settings, ports, Arc::new(UniformPolicy(policy)))
            .await
            .expect("the executor starts");
        let exec = Arc::new(exec);
        Self {
            exec,
            dispatch_rx,
            event_rx,
            watch,
            dispatched: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Moves whatever has arrived on the channels into `dispatched` and `events`.
    pub fn collect(&mut self) {
        while let Ok(batch) = self.dispatch_rx.try_recv() {
            self.dispatched.extend(batch);
        }
        while let Ok(e) = self.event_rx.try_recv() {
            self.events.push(e);
        }
    }

    /// Waits until every message this task has sent to these actions has been handled (an
    /// actor call is answered only after the casts this task sent before it), then collects.
    pub async fn barrier(&mut self, actions: &[&ActionRef]) {
        for a in actions {
            self.exec.stats(a).await.expect("the actor answers");
        }
        self.collect();
    }

    /// Waits until at least `n` dispatches have arrived in total.
    pub async fn until_dispatched(&mut self, n: usize) {
        let deadline = std::time::Instant::now() + super::POLL_DEADLINE;
        loop {
            self.collect();
            if self.dispatched.len() >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waited for {n} dispatches, have {:?}",
                self.dispatched_ids()
            );
            tokio::task::yield_now().await;
        }
    }

    /// Waits until some recorded event satisfies `pred`.
    pub async fn until_event(&mut self, what: &str, pred: impl Fn(&Event) -> bool) {
        let deadline = std::time::Instant::now() + super::POLL_DEADLINE;
        loop {
            self.collect();
            if self.events.iter().any(&pred) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gave up waiting for event: {what}"
            );
            tokio::task::yield_now().await;
        }
    }

    pub fn dispatched_ids(&self) -> Vec<ExecutionId> {
        self.dispatched.iter().map(|d| d.execution_id).collect()
    }

    pub fn dispatched_ids_of(&self, action: &ActionRef) -> Vec<ExecutionId> {
        self.dispatched
            .iter()
            .filter(|d| &d.action == action)
            .map(|d| d.execution_id)
            .collect()
    }

    /// Submits ids with receipts and returns where their verdicts land.
    pub fn submit(&self, action: &ActionRef, ids: &[ExecutionId]) -> Vec<Answer<Verdict>> {
        let mut answers = Vec::new();
        let batch: Vec<Submission> = ids
            .iter()
            .map(|&id| {
                let (receipt, answer) = Answer::new();
                answers.push(answer);
                let mut s = sub(id);
                s.receipt = Some(receipt);
                s
            })
            .collect();
        self.exec.submit(action, batch);
        answers
    }

    /// Submits ids and waits until each is answered `Queued`.
    pub async fn submit_accepted(&self, action: &ActionRef, ids: &[ExecutionId]) {
        let answers = self.submit(action, ids);
        poll_until("submissions answered", || {
            answers.iter().all(|a| a.get().is_some())
        })
        .await;
        for (id, a) in ids.iter().zip(&answers) {
            assert_eq!(
                a.get(),
                Some(Verdict::Queued { execution_id: *id }),
                "verdict for {id}"
            );
        }
    }

    pub fn complete(&self, ids: &[ExecutionId]) -> Vec<Answer<CompletionVerdict>> {
        let mut answers = Vec::new();
        let batch = ids
            .iter()
            .map(|&id| {
                let (receipt, answer) = Answer::new();
                answers.push(answer);
                let mut c = Completion::new(id, EndStatus::Succeeded);
                c.receipt = Some(receipt);
                c
            })
            .collect();
        self.exec.complete(batch);
        answers
    }

    /// Cancels ids as the operators' API does (`Executor::cancel`).
    pub fn cancel(&self, ids: &[ExecutionId]) -> Vec<Answer<CancelVerdict>> {
        let (batch, answers) = cancel_requests(ids);
        self.exec.cancel(batch);
        answers
    }

    /// Cancels ids as the cancels queue does (`Executor::cancel_or_remember`).
    pub fn cancel_or_remember(&self, ids: &[ExecutionId]) -> Vec<Answer<CancelVerdict>> {
        let (batch, answers) = cancel_requests(ids);
        self.exec.cancel_or_remember(batch);
        answers
    }

    pub async fn stats(&self, action: &ActionRef) -> QueueStats {
        self.exec
            .stats(action)
            .await
            .expect("the actor answers")
            .expect("the action is known")
    }

    pub async fn shutdown(self) {
        self.exec.shutdown(Duration::from_secs(5)).await;
    }
}

/// Cancel requests for `ids` with receipts, and where their verdicts land.
fn cancel_requests(ids: &[ExecutionId]) -> (Vec<CancelRequest>, Vec<Answer<CancelVerdict>>) {
    ids.iter()
        .map(|&id| {
            let (receipt, answer) = Answer::new();
            (
                CancelRequest {
                    execution_id: id,
                    receipt: Some(receipt),
                },
                answer,
            )
        })
        .unzip()
}

/// Waits for every answer and returns them.
pub async fn answers<T: Clone + Send + 'static>(what: &str, answers: &[Answer<T>]) -> Vec<T> {
    poll_until(what, || answers.iter().all(|a| a.get().is_some())).await;
    answers.iter().map(|a| a.expect(what)).collect()
}
