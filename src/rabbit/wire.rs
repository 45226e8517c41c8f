//! The contract's JSON messages: decoding what producers and workers send (with an error class
//! for each way it can be wrong) and encoding what the executor sends.
//!
//! Decoding never trusts the input: sizes are checked before parsing, serde_json's recursion
//! limit stops deeply nested documents, and every field is checked for type and range so that
//! the dead letter can say exactly what was wrong.

use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::core::Dispatch;
use crate::model::{ActionRef, EndStatus, ExecutionId, Payload};

/// Largest execution id: the ledger stores ids as Postgres BIGINT.
pub const MAX_EXECUTION_ID: u64 = i64::MAX as u64;
/// Longest `request_id` the contract allows.
pub const MAX_REQUEST_ID_LEN: usize = 255;

/// Why an incoming message could not be used. The variant name is the dead letter's
/// `error_class`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message body is {size} bytes (at most {max})")]
    MessageTooLarge { size: usize, max: usize },
    #[error("content type {0:?} is not application/json")]
    UnsupportedContentType(String),
    #[error("message body is not valid UTF-8")]
    InvalidUtf8,
    #[error("message body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidMessage(String),
    #[error("{0}")]
    InvalidActionRef(String),
    #[error("{0}")]
    InvalidExecutionId(String),
    #[error("{0}")]
    InvalidStatus(String),
}

impl DecodeError {
    pub fn error_class(&self) -> &'static str {
        match self {
            Self::MessageTooLarge { .. } => "MessageTooLarge",
            Self::UnsupportedContentType(_) => "UnsupportedContentType",
            Self::InvalidUtf8 => "InvalidUtf8",
            Self::InvalidJson(_) => "InvalidJson",
            Self::InvalidMessage(_) => "InvalidMessage",
            Self::InvalidActionRef(_) => "InvalidActionRef",
            Self::InvalidExecutionId(_) => "InvalidExecutionId",
            Self::InvalidStatus(_) => "InvalidStatus",
        }
    }
}

/// A decoded `execution.requested` message.
#[derive(Debug)]
pub struct RequestMsg {
    pub execution_id: Option<ExecutionId>,
    pub action_ref: ActionRef,
    pub request_id: Option<Box<str>>,
    pub payload: Payload,
}

/// A decoded `execution.completed` message.
#[derive(Debug)]
pub struct CompletionMsg {
    pub execution_id: ExecutionId,
    pub status: EndStatus,
    pub result: Option<Payload>,
}

/// A decoded `execution.cancel` message.
#[derive(Debug)]
pub struct CancelMsg {
    pub execution_id: ExecutionId,
}

/// What can be salvaged from a message that failed to decode, for its dead letter.
#[derive(Debug, Default, Clone)]
pub struct Salvage {
    pub execution_id: Option<ExecutionId>,
    pub action_ref: Option<String>,
    pub request_id: Option<String>,
}

/// Checks size and content type, then parses the body as a JSON object.
fn object(
    body: &[u8],
    content_type: Option<&str>,
    max_bytes: usize,
) -> Result<serde_json::Map<String, Value>, DecodeError> {
    if body.len() > max_bytes {
        return Err(DecodeError::MessageTooLarge {
            size: body.len(),
            max: max_bytes,
        });
    }
    if let Some(ct) = content_type {
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(DecodeError::UnsupportedContentType(ct.to_owned()));
        }
    }
    let text = std::str::from_utf8(body).map_err(|_| DecodeError::InvalidUtf8)?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(DecodeError::InvalidMessage(format!(
            "message must be a JSON object, not {}",
            kind_of(&other)
        ))),
        Err(e) => Err(DecodeError::InvalidJson(e.to_string())),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn execution_id(v: &Value) -> Result<ExecutionId, DecodeError> {
    match v.as_u64() {
        Some(id) if (1..=MAX_EXECUTION_ID).contains(&id) => Ok(id),
        _ => Err(DecodeError::InvalidExecutionId(format!(
            "execution_id must be an integer from 1 to {MAX_EXECUTION_ID}, not {v}"
        ))),
    }
}

fn required_execution_id(map: &serde_json::Map<String, Value>) -> Result<ExecutionId, DecodeError> {
    match map.get("execution_id") {
        None | Some(Value::Null) => Err(DecodeError::InvalidExecutionId(
            "execution_id is missing".to_owned(),
        )),
        Some(v) => execution_id(v),
    }
}

/// Re-encodes a parsed JSON value as a payload. Parameters were parsed once for validation;
/// writing them back is cheaper than parsing twice and keeps them exactly equivalent.
fn payload_of(v: &Value) -> Result<Payload, DecodeError> {
    let text = serde_json::to_string(v).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    let raw = RawValue::from_string(text).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    Ok(Payload::from_raw(raw))
}

/// Decodes an `execution.requested` message.
pub fn decode_request(
    body: &[u8],
    content_type: Option<&str>,
    max_bytes: usize,
) -> Result<RequestMsg, DecodeError> {
    let map = object(body, content_type, max_bytes)?;
    let action_ref = match map.get("action_ref") {
        None | Some(Value::Null) => {
            return Err(DecodeError::InvalidActionRef(
                "action_ref is missing".to_owned(),
            ));
        }
        Some(Value::String(s)) => {
            ActionRef::parse(s).map_err(|e| DecodeError::InvalidActionRef(format!("{e}: {s:?}")))?
        }
        Some(other) => {
            return Err(DecodeError::InvalidActionRef(format!(
                "action_ref must be a string, not {}",
                kind_of(other)
            )));
        }
    };
    let execution_id = match map.get("execution_id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(execution_id(v)?),
    };
    let request_id = match map.get("request_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= MAX_REQUEST_ID_LEN => Some(s.as_str().into()),
        Some(Value::String(s)) => {
            return Err(DecodeError::InvalidMessage(format!(
                "request_id is {} bytes long (at most {MAX_REQUEST_ID_LEN})",
                s.len()
            )));
        }
        Some(other) => {
            return Err(DecodeError::InvalidMessage(format!(
                "request_id must be a string, not {}",
                kind_of(other)
            )));
        }
    };
    let payload = match map.get("parameters") {
        None | Some(Value::Null) => Payload::empty_object(),
        Some(v @ Value::Object(_)) => payload_of(v)?,
        Some(other) => {
            return Err(DecodeError::InvalidMessage(format!(
                "parameters must be a JSON object, not {}",
                kind_of(other)
            )));
        }
    };
    Ok(RequestMsg {
        execution_id,
        action_ref,
        request_id,
        payload,
    })
}

/// Decodes an `execution.completed` message.
pub fn decode_completion(
    body: &[u8],
    content_type: Option<&str>,
    max_bytes: usize,
) -> Result<CompletionMsg, DecodeError> {
    let map = object(body, content_type, max_bytes)?;
    let execution_id = required_execution_id(&map)?;
    let status = match map.get("status") {
        Some(Value::String(s)) => EndStatus::parse(s).ok_or_else(|| {
            DecodeError::InvalidStatus(format!(
                "status {s:?} is not one of succeeded, failed, canceled, timeout (or completed)"
            ))
        })?,
        None | Some(Value::Null) => {
            return Err(DecodeError::InvalidStatus("status is missing".to_owned()));
        }
        Some(other) => {
            return Err(DecodeError::InvalidStatus(format!(
                "status must be a string, not {}",
                kind_of(other)
            )));
        }
    };
    let result = match map.get("result") {
        None | Some(Value::Null) => None,
        Some(v) => Some(payload_of(v)?),
    };
    Ok(CompletionMsg {
        execution_id,
        status,
        result,
    })
}

/// Decodes an `execution.cancel` message.
pub fn decode_cancel(
    body: &[u8],
    content_type: Option<&str>,
    max_bytes: usize,
) -> Result<CancelMsg, DecodeError> {
    let map = object(body, content_type, max_bytes)?;
    Ok(CancelMsg {
        execution_id: required_execution_id(&map)?,
    })
}

/// Picks out whatever identifies a message that failed to decode.
pub fn salvage(body: &[u8]) -> Salvage {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return Salvage::default();
    };
    Salvage {
        execution_id: map.get("execution_id").and_then(|v| execution_id(v).ok()),
        action_ref: map
            .get("action_ref")
            .and_then(Value::as_str)
            .filter(|s| s.len() <= 1024)
            .map(str::to_owned),
        request_id: map
            .get("request_id")
            .and_then(Value::as_str)
            .filter(|s| s.len() <= 1024)
            .map(str::to_owned),
    }
}

/// The original message as a dead letter carries it: the JSON itself when it parses, its text
/// when it is UTF-8 but not JSON, and base64 otherwise (flagged, so nothing is lost).
pub fn original(body: &[u8]) -> Value {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return v;
    }
    match std::str::from_utf8(body) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => serde_json::json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(body)
        }),
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The body of an `execution.dispatch.<action_ref>` message.
pub fn encode_dispatch(d: &Dispatch) -> Vec<u8> {
    #[derive(Serialize)]
    struct Wire<'a> {
        execution_id: ExecutionId,
        action_ref: &'a str,
        request_id: Option<&'a str>,
        parameters: &'a Payload,
        enqueued_at: String,
        dispatched_at: String,
        attempt: u32,
    }
    let wire = Wire {
        execution_id: d.execution_id,
        action_ref: d.action.as_str(),
        request_id: d.request_id.as_deref(),
        parameters: &d.payload,
        enqueued_at: rfc3339(d.enqueued_at),
        dispatched_at: rfc3339(d.dispatched_at),
        attempt: d.attempt,
    };
    // Serializing plain strings, integers and already-valid JSON cannot fail.
    serde_json::to_vec(&wire).unwrap_or_default()
}

/// A dispatch this executor encoded, read back from its body: what the broker returns with
/// a dispatch it could not route. `None` for a body this executor did not write.
pub fn decode_dispatch(body: &[u8]) -> Option<Dispatch> {
    #[derive(serde::Deserialize)]
    struct Wire {
        execution_id: ExecutionId,
        action_ref: String,
        request_id: Option<String>,
        parameters: Box<RawValue>,
        enqueued_at: DateTime<Utc>,
        dispatched_at: DateTime<Utc>,
        attempt: u32,
    }
    let w: Wire = serde_json::from_slice(body).ok()?;
    Some(Dispatch {
        action: ActionRef::parse(&w.action_ref).ok()?,
        execution_id: w.execution_id,
        request_id: w.request_id.map(String::into_boxed_str),
        payload: Payload::from_raw(w.parameters),
        enqueued_at: w.enqueued_at,
        dispatched_at: w.dispatched_at,
        attempt: w.attempt,
        // A header, not part of the body.
        freed_by: None,
    })
}

/// Where a dead letter came from, as the contract names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueFrom {
    /// Rejected at intake.
    Requested,
    /// Timed out or purged while waiting.
    Queued,
    /// No completion in time; the slot was reclaimed.
    Running,
    /// A completion that could not be decoded.
    Completed,
    /// A cancel that could not be decoded (not in the contract's list: cancels are the one
    /// input the contract does not give a dead-letter origin).
    Cancel,
}

impl QueueFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Cancel => "cancel",
        }
    }
}

/// A dead-letter entry, as published on `attune.dlx` with routing key `dlq.<queue_from>`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub execution_id: Option<ExecutionId>,
    pub action_ref: Option<String>,
    pub queue_from: QueueFrom,
    pub error_class: String,
    pub error_message: String,
    pub failed_at: String,
    pub retry_count: u32,
    pub request_id: Option<String>,
    pub original: Value,
}

impl DeadLetter {
    pub fn new(
        queue_from: QueueFrom,
        error_class: impl Into<String>,
        error_message: impl Into<String>,
        original: Value,
    ) -> Self {
        Self {
            execution_id: None,
            action_ref: None,
            queue_from,
            error_class: error_class.into(),
            error_message: error_message.into(),
            failed_at: rfc3339(Utc::now()),
            retry_count: 0,
            request_id: None,
            original,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The answer on `reply_to`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Reply {
    pub execution_id: Option<ExecutionId>,
    /// `queued` or `rejected`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Set when the execution id was already queued or running: nothing new was queued.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn req(body: &str) -> Result<RequestMsg, DecodeError> {
        decode_request(body.as_bytes(), Some("application/json"), MAX)
    }

    #[test]
    fn a_contract_request_decodes() {
        let r = req(r#"{"execution_id": 123, "action_ref": "core.http.get", "request_id": "req-abc123", "parameters": {"url": "https://example.org"}}"#)
            .expect("valid");
        assert_eq!(r.execution_id, Some(123));
        assert_eq!(r.action_ref.as_str(), "core.http.get");
        assert_eq!(r.request_id.as_deref(), Some("req-abc123"));
        assert_eq!(r.payload.json(), r#"{"url":"https://example.org"}"#);
    }

    #[test]
    fn optional_fields_may_be_absent() {
        let r = req(r#"{"action_ref": "a"}"#).expect("valid");
        assert_eq!(r.execution_id, None);
        assert_eq!(r.payload.json(), "{}");
    }

    #[test]
    fn each_kind_of_bad_request_gets_its_error_class() {
        let cases: &[(&[u8], Option<&str>, &str)] = &[
            (
                b"{\"action_ref\": \"a\"}",
                Some("text/plain"),
                "UnsupportedContentType",
            ),
            (b"\xff\xfe{}", None, "InvalidUtf8"),
            (b"{\"action_ref\": ", None, "InvalidJson"),
            (b"[1,2]", None, "InvalidMessage"),
            (b"{}", None, "InvalidActionRef"),
            (b"{\"action_ref\": 5}", None, "InvalidActionRef"),
            (b"{\"action_ref\": \"bad ref!\"}", None, "InvalidActionRef"),
            (
                b"{\"action_ref\": \"a\", \"execution_id\": -1}",
                None,
                "InvalidExecutionId",
            ),
            (
                b"{\"action_ref\": \"a\", \"execution_id\": 0}",
                None,
                "InvalidExecutionId",
            ),
            (
                b"{\"action_ref\": \"a\", \"execution_id\": \"7\"}",
                None,
                "InvalidExecutionId",
            ),
            (
                b"{\"action_ref\": \"a\", \"execution_id\": 1.5}",
                None,
                "InvalidExecutionId",
            ),
            (
                b"{\"action_ref\": \"a\", \"execution_id\": 9223372036854775808}",
                None,
                "InvalidExecutionId",
            ),
            (
                b"{\"action_ref\": \"a\", \"request_id\": 5}",
                None,
                "InvalidMessage",
            ),
            (
                b"{\"action_ref\": \"a\", \"parameters\": [1]}",
                None,
                "InvalidMessage",
            ),
        ];
        for (body, ct, class) in cases {
            let err = decode_request(body, *ct, MAX).expect_err("must fail");
            assert_eq!(
                err.error_class(),
                *class,
                "body {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn deeply_nested_json_is_refused_without_overflowing_the_stack() {
        let depth = 100_000;
        let body = format!(
            "{{\"action_ref\": \"a\", \"parameters\": {}{}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let err = req(&body).expect_err("too deep");
        assert_eq!(err.error_class(), "InvalidJson");
    }

    #[test]
    fn oversized_bodies_are_refused_before_parsing() {
        let err = decode_request(&[b' '; 2048], None, 1024).expect_err("too big");
        assert_eq!(
            err,
            DecodeError::MessageTooLarge {
                size: 2048,
                max: 1024
            }
        );
    }

    #[test]
    fn completions_accept_any_case_and_completed() {
        let c = decode_completion(
            br#"{"execution_id": 9, "status": "COMPLETED", "result": {"code": 200}}"#,
            None,
            MAX,
        )
        .expect("valid");
        assert_eq!(c.status, EndStatus::Succeeded);
        assert_eq!(
            c.result.map(|p| p.json().to_owned()).as_deref(),
            Some(r#"{"code":200}"#)
        );
        let err = decode_completion(br#"{"execution_id": 9, "status": "done"}"#, None, MAX)
            .expect_err("bad status");
        assert_eq!(err.error_class(), "InvalidStatus");
        let err = decode_completion(br#"{"status": "failed"}"#, None, MAX).expect_err("no id");
        assert_eq!(err.error_class(), "InvalidExecutionId");
    }

    #[test]
    fn originals_keep_every_byte() {
        assert_eq!(original(br#"{"a":1}"#), serde_json::json!({"a": 1}));
        assert_eq!(original(b"not json"), Value::String("not json".into()));
        assert_eq!(original(b"\xff"), serde_json::json!({"base64": "/w=="}));
    }

    #[test]
    fn dispatch_messages_carry_the_contract_fields() {
        let t = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let d = Dispatch {
            action: ActionRef::parse("core.http.get").expect("ref"),
            execution_id: 123,
            request_id: Some("req-1".into()),
            payload: Payload::from_json(r#"{"url":"x"}"#).expect("json"),
            enqueued_at: t,
            dispatched_at: t,
            attempt: 1,
            freed_by: None,
        };
        let v: Value = serde_json::from_slice(&encode_dispatch(&d)).expect("json");
        assert_eq!(v["execution_id"], 123);
        assert_eq!(v["action_ref"], "core.http.get");
        assert_eq!(v["request_id"], "req-1");
        assert_eq!(v["parameters"]["url"], "x");
        assert_eq!(v["attempt"], 1);
        assert_eq!(v["enqueued_at"], "2027-01-15T08:00:00.000000Z");
        let back = decode_dispatch(&encode_dispatch(&d)).expect("reads back");
        assert_eq!(
            (back.execution_id, back.action.as_str(), back.attempt),
            (123, "core.http.get", 1)
        );
        assert_eq!(back.request_id.as_deref(), Some("req-1"));
        assert_eq!(back.payload.json(), r#"{"url":"x"}"#);
        assert_eq!((back.enqueued_at, back.dispatched_at), (t, t));
        assert!(decode_dispatch(b"{}").is_none());
    }
}
