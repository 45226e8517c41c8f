//! Whether the service is ready to take work: `GET /ready` and systemd's `READY=1`.
//!
//! Ready means the RabbitMQ topology is declared, the consumers run and recovery from the
//! ledger is done, i.e. a producer that publishes now reaches a queue the executor consumes.
//! `GET /health` says nothing of this: it answers as soon as HTTP does.
//!
//! The service moves it through these states, each not-ready one with a reason for the
//! operator:
//!
//! ```text
//!   starting ──► connecting to RabbitMQ ──► ready ◄──► RabbitMQ session lost; reconnecting
//!                  (retrying after an error)   │
//!                                              ├──► shared mode: starting over in-process
//!                                              └──► shutting down
//! ```
//!
//! While a service shuts down ([`Readiness::hold`]) a session that comes up late does not make
//! it ready; the next start ([`Readiness::starting`]) lifts that, unless the process is
//! stopping.
//!
//! Every change is also told to systemd when the process was started with `NOTIFY_SOCKET`
//! ([`super::systemd`]): `READY=1` on becoming ready, `STATUS=<reason>` on every change, and
//! `STOPPING=1` from [`Readiness::stopping`], which the command line calls once a graceful
//! stop begins (not on an in-process restart, after which the process carries on).

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::watch;

use super::systemd::Notifier;

/// Where the service stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Taking work: topology declared, consumers running, recovery done.
    Ready { since: DateTime<Utc> },
    /// Not taking work yet, or no longer; `reason` says why, for `/ready` and the log.
    NotReady {
        reason: String,
        since: DateTime<Utc>,
    },
}

impl State {
    pub fn is_ready(&self) -> bool {
        matches!(self, State::Ready { .. })
    }

    /// Since when the service has been in this state, as RFC 3339.
    pub fn since(&self) -> String {
        let (State::Ready { since } | State::NotReady { since, .. }) = self;
        since.to_rfc3339_opts(SecondsFormat::Millis, true)
    }
}

/// The service's readiness, shared by the parts that change it (the start-up, the RabbitMQ
/// edge, the shutdown) and those that read it (`GET /ready`, the start-up waiting for the
/// first session). One per process: the command line keeps it across in-process restarts.
#[derive(Debug)]
pub struct Readiness {
    /// The state; watchers wait on it.
    state: watch::Sender<State>,
    /// Set while a service is shutting down (or the process stopping): a session that comes
    /// up meanwhile must not make it ready again. Cleared by [`Readiness::starting`].
    held: AtomicBool,
    /// Set once the process stops: nothing makes it ready again.
    stopping: AtomicBool,
    /// systemd's notification socket, when the process was started with one.
    notifier: Option<Notifier>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Readiness {
    /// Not ready ("starting"); tells `notifier`, if any, of every change.
    pub fn new(notifier: Option<Notifier>) -> Self {
        let state = State::NotReady {
            reason: "starting".to_owned(),
            since: Utc::now(),
        };
        Self {
            state: watch::channel(state).0,
            held: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            notifier,
        }
    }

    /// A service starts (again, after an in-process restart): not ready, and it may become
    /// ready once more, unless the process is stopping.
    pub fn starting(&self, reason: impl Into<String>) {
        if !self.stopping.load(Ordering::Acquire) {
            self.held.store(false, Ordering::Release);
        }
        self.not_ready(reason);
    }

    /// A service is shutting down: from now until [`Readiness::starting`] nothing makes it
    /// ready. The reason in force stays (it says why, if something else said it first);
    /// if it was ready, it now says "shutting down".
    pub fn hold(&self) {
        self.held.store(true, Ordering::Release);
        if self.state().is_ready() {
            self.not_ready("shutting down");
        }
    }

    /// The state now.
    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    /// Ready now (topology declared, consumers running, recovery done).
    pub fn ready(&self) {
        let changed = self.state.send_if_modified(|s| {
            if s.is_ready() || self.held.load(Ordering::Acquire) {
                return false;
            }
            *s = State::Ready { since: Utc::now() };
            true
        });
        if changed {
            tracing::info!("ready: topology declared, consumers running, recovery done");
            self.notify("READY=1\nSTATUS=ready: consuming");
        }
    }

    /// Not ready, for `reason` (said as the operator should read it).
    pub fn not_ready(&self, reason: impl Into<String>) {
        let reason = reason.into();
        let changed = self.state.send_if_modified(|s| {
            if matches!(s, State::NotReady { reason: r, .. } if *r == reason) {
                return false;
            }
            *s = State::NotReady {
                reason: reason.clone(),
                since: Utc::now(),
            };
            true
        });
        if changed {
            tracing::debug!(%reason, "not ready");
            self.notify(&format!("STATUS=not ready: {}", one_line(&reason)));
        }
    }

    /// A graceful stop of the process begins: not ready, and systemd is told `STOPPING=1`.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Release);
        self.held.store(true, Ordering::Release);
        self.not_ready("shutting down");
        self.notify("STOPPING=1");
    }

    /// Waits until ready, at most `timeout`; whether it became ready.
    pub async fn wait_ready(&self, timeout: std::time::Duration) -> bool {
        let mut rx = self.state.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(State::is_ready))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn notify(&self, message: &str) {
        if let Some(n) = &self.notifier
            && let Err(e) = n.notify(message)
        {
            tracing::warn!(error = %e, "could not notify systemd (NOTIFY_SOCKET)");
        }
    }
}

/// systemd reads one assignment per line: a reason must not break into several.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_starts_not_ready_and_changes_only_when_the_state_does() {
        let r = Readiness::default();
        assert!(matches!(r.state(), State::NotReady { reason, .. } if reason == "starting"));
        r.ready();
        let first = r.state();
        assert!(first.is_ready());
        r.ready();
        assert_eq!(r.state(), first, "a second ready() keeps the first time");
        r.not_ready("RabbitMQ session lost");
        assert!(
            matches!(r.state(), State::NotReady { reason, .. } if reason == "RabbitMQ session lost")
        );
        r.stopping();
        assert!(matches!(r.state(), State::NotReady { reason, .. } if reason == "shutting down"));
        r.starting("starting");
        r.ready();
        assert!(
            !r.state().is_ready(),
            "a stopping process never becomes ready again"
        );
    }

    #[test]
    fn a_service_shutting_down_is_not_made_ready_by_a_late_session_until_one_starts_again() {
        let r = Readiness::default();
        r.ready();
        r.hold();
        assert!(matches!(r.state(), State::NotReady { reason, .. } if reason == "shutting down"));
        r.ready();
        assert!(!r.state().is_ready(), "held");
        r.not_ready("fenced");
        r.hold();
        assert!(
            matches!(r.state(), State::NotReady { reason, .. } if reason == "fenced"),
            "the reason in force stays"
        );
        r.starting("starting over");
        r.ready();
        assert!(r.state().is_ready(), "a new start may become ready");
    }

    #[tokio::test]
    async fn waiting_ends_when_ready_or_at_the_timeout() {
        let r = std::sync::Arc::new(Readiness::default());
        assert!(
            !r.wait_ready(std::time::Duration::from_millis(10)).await,
            "not ready: times out"
        );
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.wait_ready(std::time::Duration::from_secs(30)).await })
        };
        r.ready();
        assert!(waiter.await.expect("joins"));
    }

    #[test]
    fn a_reason_is_sent_on_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }
}
