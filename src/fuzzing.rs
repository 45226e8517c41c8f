//! What the fuzz targets (`fuzz/`, cargo-fuzz on nightly) run on each input, and what the
//! stable test `tests/fuzz_corpus.rs` replays the kept corpus through: the same functions the
//! service runs on untrusted input, each followed by what the service does next with the
//! result (a dead letter and a reply for a message it refuses, the dispatch it would send for
//! a request it takes, the HTTP answer for a body it refuses), with checks of what must hold.
//!
//! Every function here takes arbitrary bytes and returns normally; a panic is a bug, in the
//! decoder or in a check.
//!
//! Input layouts:
//! - deliveries ([`request`], [`completion`], [`cancel`]): the body, optionally preceded by a
//!   first line `ct:<content type>\n` that becomes the message's content type;
//! - [`config`]: the YAML file's text, then NUL-separated `NAME=value` environment pairs
//!   (`ATTUNE__` is put in front of a name that lacks it, as only such variables are read);
//! - [`http_body`]: the request body, read as each JSON body type the API accepts.

use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::config::{Config, ENV_PREFIX};
use crate::core::Dispatch;
use crate::http::dlq::SelectionBody;
use crate::http::extract::parse_body;
use crate::http::queues::PolicyBody;
use crate::model::{ActionRef, Payload};
use crate::ops::dlq::{MAX_REPLAY, Selection};
use crate::rabbit::wire::{
    self, DeadLetter, DecodeError, MAX_EXECUTION_ID, MAX_REQUEST_ID_LEN, QueueFrom, Reply,
};

/// The size limit the delivery targets decode with: the default `rabbitmq.max_message_bytes`.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Splits a delivery input into its content type (a first line `ct:...`) and its body.
pub fn delivery_parts(data: &[u8]) -> (Option<&str>, &[u8]) {
    let Some(rest) = data.strip_prefix(b"ct:") else {
        return (None, data);
    };
    let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    match std::str::from_utf8(&rest[..end]) {
        Ok(ct) => (Some(ct), rest.get(end + 1..).unwrap_or_default()),
        // An AMQP short string is UTF-8 once lapin has it; such an input is only a body.
        Err(_) => (None, data),
    }
}

/// An `execution.requested` delivery: decoded; taken, it becomes a dispatch that must read
/// back as it was written; refused, a dead letter and a reply.
pub fn request(data: &[u8]) {
    let (content_type, body) = delivery_parts(data);
    match wire::decode_request(body, content_type, MAX_MESSAGE_BYTES) {
        Ok(req) => {
            check_action_ref(&req.action_ref);
            if let Some(id) = req.execution_id {
                check_execution_id(id);
            }
            if let Some(rid) = &req.request_id {
                assert!(rid.len() <= MAX_REQUEST_ID_LEN, "request_id too long taken");
            }
            assert!(
                matches!(json_of(&req.payload), Value::Object(_)),
                "parameters taken that are not an object"
            );
            let at = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap_or_default();
            let dispatch = Dispatch {
                action: req.action_ref,
                execution_id: req.execution_id.unwrap_or(1),
                request_id: req.request_id,
                payload: req.payload,
                enqueued_at: at,
                dispatched_at: at,
                attempt: 1,
                freed_by: None,
            };
            let encoded = wire::encode_dispatch(&dispatch);
            let back = wire::decode_dispatch(&encoded).expect("a dispatch reads back");
            assert_eq!(back.action.as_str(), dispatch.action.as_str());
            assert_eq!(back.execution_id, dispatch.execution_id);
            assert_eq!(back.request_id, dispatch.request_id);
            assert_eq!(back.payload.json(), dispatch.payload.json());
            let reply = Reply {
                execution_id: Some(dispatch.execution_id),
                status: "queued",
                error: None,
                duplicate: false,
            };
            json_of_bytes(&reply.encode());
        }
        Err(e) => {
            let letter = refused(body, QueueFrom::Requested, &e);
            let reply = Reply {
                execution_id: letter.execution_id,
                status: "rejected",
                error: Some(e.to_string()),
                duplicate: false,
            };
            json_of_bytes(&reply.encode());
        }
    }
}

/// An `execution.completed` delivery: decoded, or dead-lettered.
pub fn completion(data: &[u8]) {
    let (content_type, body) = delivery_parts(data);
    match wire::decode_completion(body, content_type, MAX_MESSAGE_BYTES) {
        Ok(c) => {
            check_execution_id(c.execution_id);
            if let Some(result) = &c.result {
                json_of(result);
            }
            // What the ledger is told (`status` must be one of the contract's words).
            assert!(!c.status.as_str().is_empty());
        }
        Err(e) => {
            refused(body, QueueFrom::Completed, &e);
        }
    }
}

/// An `execution.cancel` delivery: decoded, or dead-lettered.
pub fn cancel(data: &[u8]) {
    let (content_type, body) = delivery_parts(data);
    match wire::decode_cancel(body, content_type, MAX_MESSAGE_BYTES) {
        Ok(c) => check_execution_id(c.execution_id),
        Err(e) => {
            refused(body, QueueFrom::Cancel, &e);
        }
    }
}

/// The dead letter the consumers publish for a refused message (as `refuse` builds it),
/// encoded and read back: it must be a JSON object naming the error class.
fn refused(body: &[u8], queue_from: QueueFrom, e: &DecodeError) -> DeadLetter {
    assert!(!e.error_class().is_empty());
    let salvage = wire::salvage(body);
    let mut letter = DeadLetter::new(
        queue_from,
        e.error_class(),
        e.to_string(),
        wire::original(body),
    );
    letter.execution_id = salvage.execution_id;
    letter.action_ref = salvage.action_ref;
    letter.request_id = salvage.request_id;
    if let Some(id) = letter.execution_id {
        check_execution_id(id);
    }
    let encoded = json_of_bytes(&letter.encode());
    assert_eq!(
        encoded.get("error_class").and_then(Value::as_str),
        Some(e.error_class()),
        "the dead letter names its error class"
    );
    letter
}

fn check_action_ref(a: &ActionRef) {
    assert!(
        ActionRef::parse(a.as_str()).is_ok(),
        "an action ref taken that does not parse again"
    );
}

fn check_execution_id(id: u64) {
    assert!(
        (1..=MAX_EXECUTION_ID).contains(&id),
        "execution id {id} out of range taken"
    );
}

fn json_of(p: &Payload) -> Value {
    serde_json::from_str(p.json()).expect("a payload is valid JSON")
}

fn json_of_bytes(bytes: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(bytes).expect("what the executor sends is valid JSON");
    assert!(v.is_object(), "what the executor sends is a JSON object");
    v
}

/// Splits a config input into the YAML text and the environment pairs.
pub fn config_parts(data: &[u8]) -> (String, Vec<(String, String)>) {
    let mut parts = data.split(|&b| b == 0);
    let yaml = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let env = parts
        .map(|pair| {
            let pair = String::from_utf8_lossy(pair);
            let (name, value) = pair.split_once('=').unwrap_or((&pair, ""));
            let name = if name.starts_with(ENV_PREFIX) {
                name.to_owned()
            } else {
                format!("{ENV_PREFIX}{name}")
            };
            (name, value.to_owned())
        })
        .collect();
    (yaml, env)
}

/// The config loader on a YAML text and a set of `ATTUNE__` variables, as `serve` runs it at
/// start and on reload; its error is rendered as the operator would read it.
pub fn config(data: &[u8]) {
    let (yaml, env) = config_parts(data);
    match Config::load_from(Some(("fuzz.yaml", &yaml)), env) {
        Ok(config) => {
            assert!(crate::config::changed_keys(&config, &config).is_empty());
            // The dump the config endpoint and `--print-config` show.
            let _ = format!("{config:?}");
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
        }
    }
}

/// Every JSON body the HTTP API accepts, read and checked as its handler does; a refusal is
/// rendered as the response the client would get (a 4xx).
pub fn http_body(data: &[u8]) {
    // POST /api/v1/dlq/replay and /api/v1/dlq/discard.
    match parse_body::<SelectionBody>(data).and_then(SelectionBody::selection) {
        Ok(Selection::Ids(ids)) => {
            assert!((1..=MAX_REPLAY).contains(&ids.len()));
            ids.into_iter().for_each(check_execution_id);
        }
        Ok(Selection::First(n) | Selection::Matching(_, n)) => {
            assert!((1..=MAX_REPLAY).contains(&n));
        }
        Err(e) => refused_request(e),
    }
    // PUT /api/v1/actions/{ref}/policy.
    match parse_body::<PolicyBody>(data).and_then(|b| b.validate()) {
        Ok(patch) => assert!(
            !patch.is_empty(),
            "a policy body that changes nothing taken"
        ),
        Err(e) => refused_request(e),
    }
}

fn refused_request(e: crate::http::error::ApiError) {
    let status = e.status();
    assert!(status.is_client_error(), "a body refused with {status}");
    let response = e.into_response();
    assert_eq!(response.status(), status);
}
