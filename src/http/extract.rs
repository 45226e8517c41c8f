//! Extractors whose rejections are [`ApiError`]s naming the field at fault, instead of axum's
//! plain-text ones.

use std::collections::{BTreeMap, HashSet};

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::model::{ActionRef, ExecutionId};
use crate::rabbit::wire::MAX_EXECUTION_ID;

/// A JSON body, deserialised with the path of the offending field on failure.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "the body must be JSON, sent with `Content-Type: application/json`".to_owned(),
            ));
        }
        // `Bytes` honours `DefaultBodyLimit`, i.e. `api.max_body_bytes`.
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(
                    "the body is larger than api.max_body_bytes allows".to_owned(),
                )
            } else {
                ApiError::BadRequest {
                    field: None,
                    message: format!("could not read the body: {}", rejection.body_text()),
                }
            }
        })?;
        parse_body(&bytes).map(Json)
    }
}

/// Reads a request body as `T`: the whole of it one JSON value (trailing characters are an
/// error), with the path of the offending field in the error. What [`Json`] does once the
/// content type and the size are checked; the fuzz targets call it directly.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = (path != ".").then_some(path);
        ApiError::BadRequest {
            message: match &field {
                Some(f) => format!("{f}: {inner}"),
                None => format!("the body is not valid: {inner}"),
            },
            field,
        }
    })?;
    // Trailing characters after the value are an error too.
    de.end().map_err(|e| ApiError::BadRequest {
        field: None,
        message: format!("the body is not valid: {e}"),
    })?;
    Ok(value)
}

/// The query string as name → value, read by the handlers with the `get_*` helpers so that
/// every error names its parameter. Repeated or unknown parameters are refused.
#[derive(Debug, Default)]
pub struct Params(BTreeMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|_| ApiError::BadRequest {
                field: None,
                message: "the query string is not valid URL encoding".to_owned(),
            })?
            .0;
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            if map.contains_key(&k) {
                return Err(ApiError::bad_request(k, "given more than once"));
            }
            map.insert(k, v);
        }
        Ok(Params(map))
    }
}

impl Params {
    /// Refuses parameters other than `allowed`.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(ApiError::bad_request(
                k.clone(),
                format!(
                    "unknown query parameter `{k}`; expected {}",
                    if allowed.is_empty() {
                        "none".to_owned()
                    } else {
                        allowed.join(", ")
                    }
                ),
            )),
            None => Ok(()),
        }
    }

    /// A parameter's raw value, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A whole number within `min..=max`, `default` when absent.
    pub fn get_usize(
        &self,
        name: &str,
        default: usize,
        min: usize,
        max: usize,
    ) -> Result<usize, ApiError> {
        let Some(raw) = self.0.get(name) else {
            return Ok(default);
        };
        match raw.parse::<usize>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                name,
                format!("`{name}` must be a whole number from {min} to {max}"),
            )),
        }
    }

    /// `true` or `false`, `default` when absent.
    pub fn get_bool(&self, name: &str, default: bool) -> Result<bool, ApiError> {
        match self.0.get(name).map(String::as_str) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(_) => Err(ApiError::bad_request(
                name,
                format!("`{name}` must be true or false"),
            )),
        }
    }

    /// One of `choices`, `default` when absent.
    pub fn get_choice<'a>(
        &self,
        name: &str,
        choices: &[&'a str],
        default: &'a str,
    ) -> Result<&'a str, ApiError> {
        let Some(raw) = self.0.get(name) else {
            return Ok(default);
        };
        choices
            .iter()
            .find(|c| **c == raw.as_str())
            .copied()
            .ok_or_else(|| {
                ApiError::bad_request(
                    name,
                    format!("`{name}` must be one of {}", choices.join(", ")),
                )
            })
    }
}

/// Checks a path's `{ref}` against the action-ref rule.
pub fn action_ref(raw: &str) -> Result<ActionRef, ApiError> {
    ActionRef::parse(raw).map_err(|e| ApiError::bad_request("action_ref", e.to_string()))
}

/// Reads a comma-separated list of action refs from the query parameter `field`: valid refs,
/// 1 to `max` of them, duplicates dropped, in the order named.
pub fn action_refs(field: &str, raw: &str, max: usize) -> Result<Vec<ActionRef>, ApiError> {
    let mut seen = HashSet::new();
    let mut refs = Vec::new();
    for part in raw.split(',').filter(|p| !p.is_empty()) {
        let r = ActionRef::parse(part)
            .map_err(|e| ApiError::bad_request(field, format!("'{part}': {e}")))?;
        if seen.insert(r.clone()) {
            refs.push(r);
        }
    }
    if refs.is_empty() || refs.len() > max {
        return Err(ApiError::bad_request(
            field,
            format!("{field} must name 1 to {max} action refs, separated by commas"),
        ));
    }
    Ok(refs)
}

/// Checks a path's `{id}`: an execution id is a whole number from 1 to 2^63 - 1.
pub fn execution_id(raw: &str) -> Result<ExecutionId, ApiError> {
    match raw.parse::<u64>() {
        Ok(id) if (1..=MAX_EXECUTION_ID).contains(&id) => Ok(id),
        _ => Err(ApiError::bad_request(
            "execution_id",
            format!("execution_id must be a whole number from 1 to {MAX_EXECUTION_ID}"),
        )),
    }
}

/// A single path parameter as text, whatever route it comes from. Path segments that are not
/// valid UTF-8 after percent-decoding are refused here.
#[derive(Debug)]
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|p| PathParam(p.0))
            .map_err(|rejection| ApiError::BadRequest {
                field: None,
                message: format!("bad path: {}", rejection.body_text()),
            })
    }
}
