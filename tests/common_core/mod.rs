//! Helpers shared by the core test binaries (`core_queue`, `core_executor`, `core_props`).
//!
//! Named `common_core` rather than `support` so it cannot collide with the RabbitMQ test
//! helpers that live in `tests/support/`.

// Every test binary compiles this module but each uses only part of it.
#![allow(dead_code)]

pub mod exec;
pub mod oracle;
pub mod rig;

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fifo_executor::core::ActionPolicy;
use fifo_executor::model::{ActionRef, ExecutionId, Payload, Receipt, Submission};

/// How long `poll_until` waits, in real (wall-clock) time, before declaring failure. Real time
/// on purpose: the tests run with tokio time paused, and a deadline on the paused clock would
/// either never pass or move when a test advances time.
pub const POLL_DEADLINE: Duration = Duration::from_secs(10);

/// Waits until `cond` holds, letting other tasks (the actors) run in between. Never sleeps a
/// fixed time and never advances paused tokio time: it only yields. Because it keeps the
/// runtime busy, paused time does not auto-advance meanwhile either; to wait for something
/// driven by a timer, advance time first or await a channel.
pub async fn poll_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + POLL_DEADLINE;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up after {POLL_DEADLINE:?} waiting for: {what}"
        );
        tokio::task::yield_now().await;
    }
}

/// Like [`poll_until`], for a condition that has to await (an actor call, for instance).
pub async fn poll_until_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + POLL_DEADLINE;
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up after {POLL_DEADLINE:?} waiting for: {what}"
        );
        tokio::task::yield_now().await;
    }
}

pub fn action(name: &str) -> ActionRef {
    ActionRef::parse(name).expect("test action refs are valid")
}

pub fn limit(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("test limits are at least 1")
}

/// An enabled policy with the given concurrency limit and no rate limit.
pub fn policy(concurrency: u32) -> ActionPolicy {
    ActionPolicy {
        concurrency_limit: limit(concurrency),
        rate_limit: None,
        enabled: true,
    }
}

/// A tiny payload that names the execution, so a mixed-up payload shows.
pub fn payload_of(id: ExecutionId) -> Payload {
    Payload::from_json(&format!("{{\"n\":{id}}}")).expect("valid json")
}

pub fn sub(id: ExecutionId) -> Submission {
    Submission::new(id, payload_of(id))
}

pub fn subs(ids: impl IntoIterator<Item = ExecutionId>) -> Vec<Submission> {
    ids.into_iter().map(sub).collect()
}

/// Where a receipt's answer lands, so a test can look at it afterwards.
#[derive(Debug)]
pub struct Answer<T>(Arc<Mutex<Vec<T>>>);

impl<T> Clone for Answer<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Clone + Send + 'static> Answer<T> {
    /// A receipt and the place its answer will land.
    pub fn new() -> (Receipt<T>, Self) {
        let slot = Arc::new(Mutex::new(Vec::new()));
        let answers = slot.clone();
        let receipt = Receipt::new(move |v| lock(&answers).push(v));
        (receipt, Self(slot))
    }

    /// The answer, if one came. Panics if the receipt was settled more than once, which the
    /// type system should already rule out.
    pub fn get(&self) -> Option<T> {
        let answers = lock(&self.0);
        assert!(answers.len() <= 1, "a receipt was answered more than once");
        answers.first().cloned()
    }

    pub fn expect(&self, what: &str) -> T {
        self.get()
            .unwrap_or_else(|| panic!("no answer yet for {what}"))
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `fut` on its own current-thread runtime with paused time, on a separate thread, and
/// fails if it has not finished within [`POLL_DEADLINE`] of real time. For tests where a
/// regression would show as a task that keeps the runtime busy forever (so paused time never
/// advances and no tokio-side deadline could fire). A panic inside `fut` is passed on.
pub fn run_paused_within_deadline<F>(what: &str, fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a test runtime builds");
        let _ = tx.send(rt.block_on(fut));
    });
    match rx.recv_timeout(POLL_DEADLINE) {
        Ok(out) => out,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match runner.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => panic!("{what}: the runtime ended without a result"),
        },
        // The runner thread is left behind; the test binary exits when the tests are done.
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: not done after {POLL_DEADLINE:?} of real time")
        }
    }
}
