//! The vocabulary shared by the core and every edge: action refs, execution ids, payloads,
//! timestamps, and the requests that enter the executor.
//!
//! Nothing here knows about RabbitMQ, Postgres or HTTP; edges translate their wire formats into
//! these types and back.

use std::fmt;
use std::sync::Arc;

use serde_json::value::RawValue;

/// Identifier of one execution. Producers may supply it (it is then their idempotency key);
/// otherwise the executor assigns one that never collides with an id it has seen.
pub type ExecutionId = u64;

/// Longest action ref the contract allows.
pub const MAX_ACTION_REF_LEN: usize = 255;

/// A validated action reference such as `core.http.get`.
///
/// Cheap to clone (one reference count): every queued execution, event and dispatch names its
/// action, and they must not each carry their own copy of the string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActionRef(Arc<str>);

/// Why a string is not an action ref.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidActionRef {
    #[error("action_ref is empty")]
    Empty,
    #[error("action_ref is {0} characters long (at most {MAX_ACTION_REF_LEN})")]
    TooLong(usize),
    #[error("action_ref contains {0:?}; only letters, digits, '_', '.' and '-' are allowed")]
    BadCharacter(char),
}

impl ActionRef {
    /// Checks the contract's rule: 1–255 characters of `[A-Za-z0-9_.-]`.
    pub fn parse(s: &str) -> Result<Self, InvalidActionRef> {
        validate_action_ref(s)?;
        Ok(Self(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The action-ref rule on its own, for callers that only need to check a string.
pub fn validate_action_ref(s: &str) -> Result<(), InvalidActionRef> {
    if s.is_empty() {
        return Err(InvalidActionRef::Empty);
    }
    if s.len() > MAX_ACTION_REF_LEN {
        return Err(InvalidActionRef::TooLong(s.chars().count()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(InvalidActionRef::BadCharacter(c));
    }
    Ok(())
}

impl fmt::Display for ActionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ActionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl serde::Serialize for ActionRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl AsRef<str> for ActionRef {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// An execution's parameters as the producer sent them: JSON text, validated once at intake
/// and never parsed again. Shared, because the queue, the ledger and the dispatch all need it
/// and a copy per hop would cost more than the queue entry itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Arc<str>);

impl Payload {
    /// The payload of a request that carried no parameters.
    pub fn empty_object() -> Self {
        Self(Arc::from("{}"))
    }

    /// Takes JSON that serde_json has already validated.
    pub fn from_raw(raw: Box<RawValue>) -> Self {
        let text: Box<str> = raw.into();
        Self(Arc::from(text))
    }

    /// Parses and validates JSON text.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let raw: Box<RawValue> = serde_json::from_str(text)?;
        Ok(Self::from_raw(raw))
    }

    /// The JSON text, ready to be spliced into an outgoing message.
    pub fn json(&self) -> &str {
        &self.0
    }

    /// Length of the JSON text in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The text was validated when the payload was built, so re-borrowing it as raw JSON
        // cannot fail; if it somehow did, fall back to a string rather than panic.
        match serde_json::from_str::<&RawValue>(&self.0) {
            Ok(raw) => raw.serialize(serializer),
            Err(_) => serializer.serialize_str(&self.0),
        }
    }
}

/// How an execution that held a slot ended, as its worker reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndStatus {
    Succeeded,
    Failed,
    Canceled,
    Timeout,
}

impl EndStatus {
    /// Reads the contract's status names, case-insensitively; `completed` means `succeeded`.
    pub fn parse(s: &str) -> Option<Self> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "succeeded" | "completed" => Some(Self::Succeeded),
            "failed" => Some(Self::Failed),
            "canceled" | "cancelled" => Some(Self::Canceled),
            "timeout" => Some(Self::Timeout),
            _ => None,
        }
    }

    /// The status as the `execution` table and the metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Timeout => "timeout",
        }
    }
}

/// A one-shot callback through which the core tells an edge what became of something it handed
/// in (a request, a completion, a cancel). Edges use it to acknowledge the AMQP delivery, answer
/// `reply_to`, or answer an HTTP call; the core never knows which.
pub struct Receipt<T>(Box<dyn FnOnce(T) + Send>);

impl<T> Receipt<T> {
    pub fn new(f: impl FnOnce(T) + Send + 'static) -> Self {
        Self(Box::new(f))
    }

    /// Delivers the answer. Consumes the receipt, so nothing is answered twice.
    pub fn settle(self, value: T) {
        (self.0)(value)
    }
}

impl<T> fmt::Debug for Receipt<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Receipt")
    }
}

impl<T: Clone + Send + 'static> Receipt<T> {
    /// One receipt that answers both `a` and `b` with the same value (two messages asking
    /// for the same thing, answered together).
    pub fn both(a: Option<Receipt<T>>, b: Option<Receipt<T>>) -> Option<Receipt<T>> {
        match (a, b) {
            (Some(a), Some(b)) => Some(Receipt::new(move |value: T| {
                a.settle(value.clone());
                b.settle(value);
            })),
            (a, b) => a.or(b),
        }
    }
}

/// Settles an optional receipt; most in-process callers pass none.
pub(crate) fn settle<T>(receipt: Option<Receipt<T>>, value: T) {
    if let Some(r) = receipt {
        r.settle(value);
    }
}

/// A request to run an execution, after the edge decoded and validated it.
#[derive(Debug)]
pub struct Submission {
    pub execution_id: ExecutionId,
    /// Carried through to dispatch, dead letters and logs so one request can be followed.
    pub request_id: Option<Box<str>>,
    pub payload: Payload,
    /// Answered with the [`Verdict`] once the acceptance is safe (see `OutcomeSink`).
    pub receipt: Option<Receipt<Verdict>>,
}

impl Submission {
    pub fn new(execution_id: ExecutionId, payload: Payload) -> Self {
        Self {
            execution_id,
            request_id: None,
            payload,
            receipt: None,
        }
    }
}

/// What the executor decided about a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted: waiting in the queue or already admitted to a slot.
    Queued { execution_id: ExecutionId },
    /// This execution id is already queued or running; nothing was added.
    Duplicate { execution_id: ExecutionId },
    Rejected {
        execution_id: ExecutionId,
        rejection: Rejection,
    },
}

/// Why a submission was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    QueueFull {
        max: usize,
    },
    ActionDisabled,
    /// The executor is shutting down and accepts nothing new; the edge should leave the message
    /// with the broker.
    ShuttingDown,
}

impl Rejection {
    /// The `error_class` of the dead-letter entry.
    pub fn error_class(&self) -> &'static str {
        match self {
            Self::QueueFull { .. } => "QueueFull",
            Self::ActionDisabled => "ActionDisabled",
            Self::ShuttingDown => "ShuttingDown",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::QueueFull { max } => write!(f, "Queue full (max length: {max})"),
            Self::ActionDisabled => f.write_str("Action is disabled"),
            Self::ShuttingDown => f.write_str("Executor is shutting down"),
        }
    }
}

/// A worker's report that an execution ended.
#[derive(Debug)]
pub struct Completion {
    pub execution_id: ExecutionId,
    pub status: EndStatus,
    pub result: Option<Payload>,
    pub receipt: Option<Receipt<CompletionVerdict>>,
}

impl Completion {
    pub fn new(execution_id: ExecutionId, status: EndStatus) -> Self {
        Self {
            execution_id,
            status,
            result: None,
            receipt: None,
        }
    }
}

/// What a completion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionVerdict {
    /// The execution held a slot; the slot is free now.
    Freed,
    /// Freed nothing; see the reason.
    Unmatched(UnmatchedReason),
}

/// Why a completion freed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnmatchedReason {
    /// No queued or running execution has this id (never seen, already completed, or reclaimed).
    Unknown,
    /// The execution is still waiting in its queue; it was never dispatched.
    NeverDispatched,
}

impl UnmatchedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::NeverDispatched => "never_dispatched",
        }
    }
}

/// A request to cancel a waiting execution.
#[derive(Debug)]
pub struct CancelRequest {
    pub execution_id: ExecutionId,
    pub receipt: Option<Receipt<CancelVerdict>>,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelVerdict {
    /// Removed from its queue and recorded as canceled.
    Canceled,
    /// Already holds a slot; it is left to its worker.
    Running,
    /// No queued or running execution has this id.
    Unknown,
    /// No execution has this id yet: its request is canceled when it arrives
    /// ([`Executor::cancel_or_remember`](crate::core::Executor::cancel_or_remember)).
    Remembered,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_refs_follow_the_contract_rule() {
        assert!(ActionRef::parse("core.http.get").is_ok());
        assert!(ActionRef::parse("a-b_c.D9").is_ok());
        assert_eq!(ActionRef::parse(""), Err(InvalidActionRef::Empty));
        assert_eq!(
            ActionRef::parse("core http"),
            Err(InvalidActionRef::BadCharacter(' '))
        );
        assert_eq!(
            ActionRef::parse("caf\u{e9}"),
            Err(InvalidActionRef::BadCharacter('\u{e9}'))
        );
        assert!(ActionRef::parse(&"a".repeat(255)).is_ok());
        assert_eq!(
            ActionRef::parse(&"a".repeat(256)),
            Err(InvalidActionRef::TooLong(256))
        );
    }

    #[test]
    fn end_status_reads_contract_names_case_insensitively() {
        assert_eq!(EndStatus::parse("SUCCEEDED"), Some(EndStatus::Succeeded));
        assert_eq!(EndStatus::parse("completed"), Some(EndStatus::Succeeded));
        assert_eq!(EndStatus::parse("Failed"), Some(EndStatus::Failed));
        assert_eq!(EndStatus::parse("timeout"), Some(EndStatus::Timeout));
        assert_eq!(EndStatus::parse("canceled"), Some(EndStatus::Canceled));
        assert_eq!(EndStatus::parse("done"), None);
    }

    #[test]
    fn queue_full_message_matches_the_runbook_text() {
        assert_eq!(
            Rejection::QueueFull { max: 10000 }.to_string(),
            "Queue full (max length: 10000)"
        );
    }

    #[test]
    fn payload_serializes_as_the_original_json() {
        let p = Payload::from_json(r#"{"url": "https://example.org"}"#).expect("valid json");
        let out = serde_json::to_string(&p).expect("serializes");
        assert_eq!(out, r#"{"url": "https://example.org"}"#);
        assert!(Payload::from_json("{not json").is_err());
    }
}
