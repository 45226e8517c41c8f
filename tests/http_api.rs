//! The HTTP API through `router(state).oneshot(…)`, without a socket: every endpoint, every way
//! to be refused (no token, a wrong one, none configured), and bad input of every kind, which
//! must get a JSON 4xx naming the culprit and never a 500.
//!
//! The executor behind it is the real core with in-memory ports. The DLQ endpoints' success
//! paths need RabbitMQ and live in `ops_dlq.rs`.

mod support;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use fifo_executor::config::{HealthThresholds, Secret};
use fifo_executor::core::memory::{ChannelDispatcher, DiscardSink, LatestStats};
use fifo_executor::core::{
    ActionPolicy, Executor, PolicyPatch, Ports, QueueSettings, RateLimit, UniformPolicy,
};
use fifo_executor::http::{self, AppState, ROUTES};
use fifo_executor::model::{ActionRef, Completion, EndStatus, Payload, Submission};
use fifo_executor::ops::health::HealthMonitor;
use fifo_executor::ops::history::Sampler;
use fifo_executor::ops::hooks::{
    HookError, LedgerPurge, LedgerPurgeOrder, LedgerPurged, NoHealthStore, NoLedgerPurge,
    NoPolicyStore, PolicyStore,
};
use fifo_executor::ops::metrics::{self, ActionTallies, Metrics};
use fifo_executor::ops::purge::Purger;
use fifo_executor::ops::readiness::Readiness;
use fifo_executor::ops::reload::Reloader;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tower::ServiceExt;

const TOKEN: &str = "s3cret-token";

/// An executor whose actions run one execution at a time, reporting to `stats`.
async fn executor(stats: Arc<LatestStats>) -> Arc<Executor> {
    let (dispatcher, _dispatched) = ChannelDispatcher::new();
    let ports = Ports {
        dispatcher: Arc::new(dispatcher),
        sink: Arc::new(DiscardSink),
        observer: stats,
    };
    Arc::new(
        Executor::start(
            QueueSettings::default(),
            ports,
            Arc::new(UniformPolicy(ActionPolicy::default())),
        )
        .await
        .expect("the executor starts"),
    )
}

struct Rig {
    app: Router,
    exec: Arc<Executor>,
    health: Arc<HealthMonitor>,
    readiness: Arc<Readiness>,
}

struct Options {
    token: Option<&'static str>,
    policies: Arc<dyn PolicyStore>,
    ledger: Arc<dyn LedgerPurge>,
    max_body_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            token: Some(TOKEN),
            policies: Arc::new(NoPolicyStore::default()),
            ledger: Arc::new(NoLedgerPurge),
            max_body_bytes: 64 * 1024,
        }
    }
}

async fn rig_with(o: Options) -> Rig {
    let stats = Arc::new(LatestStats::default());
    let exec = executor(stats.clone()).await;
    let health = Arc::new(HealthMonitor::new(
        exec.clone(),
        None,
        HealthThresholds::default(),
        false,
        Arc::new(NoHealthStore),
    ));
    let purger = Arc::new(Purger::new(
        exec.clone(),
        support::purge_settings(),
        o.ledger,
    ));
    let handle = metrics::install().expect("the recorder installs");
    let readiness = Arc::new(Readiness::default());
    let app = http::router(AppState {
        executor: exec.clone(),
        stats: stats.clone(),
        health: health.clone(),
        purger,
        dlq: None,
        metrics: Some(Metrics::new(
            handle,
            stats.clone(),
            Arc::new(ActionTallies::default()),
            std::time::Duration::from_secs(600),
        )),
        policies: o.policies,
        admin_token: o.token.map(Secret::new),
        max_body_bytes: o.max_body_bytes,
        reloader: Arc::new(Reloader::given(fifo_executor::config::Config::default())),
        cluster: fifo_executor::http::cluster::ClusterView::alone("test".to_owned(), 16),
        readiness: readiness.clone(),
        history: Arc::new(Sampler::new(exec.clone(), stats, None)),
    });
    Rig {
        app,
        exec,
        health,
        readiness,
    }
}

async fn rig() -> Rig {
    rig_with(Options::default()).await
}

fn action(s: &str) -> ActionRef {
    ActionRef::parse(s).expect("valid ref")
}

fn submit(exec: &Executor, a: &str, ids: std::ops::RangeInclusive<u64>) {
    exec.submit(
        &action(a),
        ids.map(|id| Submission::new(id, Payload::empty_object()))
            .collect(),
    );
}

/// A request; `auth` adds the right bearer token.
fn req(method: Method, uri: &str, auth: bool, body: Option<Value>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    if auth {
        b = b.header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
    }
    match body {
        Some(v) => b
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(v.to_string())),
        None => b.body(Body::empty()),
    }
    .expect("a valid request")
}

/// Sends and returns the status and the body (as JSON when it is, else as a string).
async fn send(app: &Router, r: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(r).await.expect("the router answers");
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("a body");
    let body = if is_json {
        serde_json::from_slice(&bytes).expect("JSON as announced")
    } else {
        Value::String(String::from_utf8_lossy(&bytes).into_owned())
    };
    (status, body)
}

async fn get(app: &Router, uri: &str) -> (StatusCode, Value) {
    send(app, req(Method::GET, uri, false, None)).await
}

fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["code"], code, "body: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "an error message: {body}"
    );
}

/// Fills a route's path parameters with valid values.
fn concrete(path: &str) -> String {
    path.replace("{ref}", "core.http.get").replace("{id}", "42")
}

// ---------------------------------------------------------------------------------------------
// Queue statistics

#[tokio::test]
async fn queue_stats_of_a_seen_action_carry_the_contract_fields() {
    let r = rig().await;
    submit(&r.exec, "core.http.get", 1..=3);
    let (status, body) = get(&r.app, "/api/v1/actions/core.http.get/queue-stats").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let d = &body["data"];
    assert_eq!(d["action_ref"], "core.http.get");
    assert_eq!(d["queue_length"], 2);
    assert_eq!(d["active_count"], 1);
    assert_eq!(d["max_concurrent"], 1);
    assert_eq!(d["total_enqueued"], 3);
    assert_eq!(d["total_completed"], 0);
    let oldest = d["oldest_enqueued_at"]
        .as_str()
        .expect("a time while some wait");
    assert!(
        chrono::DateTime::parse_from_rfc3339(oldest).is_ok(),
        "{oldest}"
    );
    let updated = d["last_updated"].as_str().expect("a time");
    assert!(
        chrono::DateTime::parse_from_rfc3339(updated).is_ok(),
        "{updated}"
    );

    r.exec.complete(
        (1..=3)
            .map(|id| Completion::new(id, EndStatus::Succeeded))
            .collect(),
    );
    // The runbook's own command, minus curl: `jq '.data.queue_length'`.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = get(&r.app, "/api/v1/actions/core.http.get/queue-stats").await;
        if body["data"]["total_completed"] == 3 {
            assert_eq!(body["data"]["queue_length"], 0);
            assert_eq!(body["data"]["oldest_enqueued_at"], Value::Null);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "completions applied: {body}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn queue_stats_of_an_action_never_seen_are_a_json_404_not_found() {
    let r = rig().await;
    let (status, body) = get(&r.app, "/api/v1/actions/never.seen/queue-stats").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "NOT_FOUND");
}

#[tokio::test]
async fn queue_stats_of_a_ref_that_breaks_the_action_ref_rule_are_a_400_naming_action_ref() {
    let r = rig().await;
    let too_long = format!("/api/v1/actions/{}/queue-stats", "a".repeat(256));
    for uri in [
        "/api/v1/actions/bad%20ref/queue-stats",
        "/api/v1/actions/caf%C3%A9/queue-stats",
        "/api/v1/actions/a%2Fb/queue-stats",
        too_long.as_str(),
    ] {
        let (status, body) = get(&r.app, uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_error(&body, "BAD_REQUEST");
        assert_eq!(body["field"], "action_ref", "{uri}");
    }
    // Not UTF-8 once decoded.
    let (status, body) = get(&r.app, "/api/v1/actions/%FF/queue-stats").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_error(&body, "BAD_REQUEST");
}

#[tokio::test]
async fn the_queue_list_sorts_orders_and_limits() {
    let r = rig().await;
    submit(&r.exec, "list.small", 1..=2);
    submit(&r.exec, "list.big", 10..=15);
    submit(&r.exec, "list.mid", 20..=23);
    let (status, body) = get(
        &r.app,
        "/api/v1/queues?sort=queue_length&order=desc&limit=2",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let names: Vec<&str> = body["data"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|d| d["action_ref"].as_str().expect("a ref"))
        .collect();
    assert_eq!(names, vec!["list.big", "list.mid"]);
    assert_eq!(body["total"], 3);

    let (_, body) = get(&r.app, "/api/v1/queues?sort=queue_length&order=asc").await;
    assert_eq!(body["data"][0]["action_ref"], "list.small");
    let (_, body) = get(&r.app, "/api/v1/queues?sort=oldest").await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(3));
    let (_, body) = get(&r.app, "/api/v1/queues?sort=active_count").await;
    assert_eq!(body["data"][0]["active_count"], 1);
}

#[tokio::test]
async fn bad_queue_list_parameters_are_a_400_naming_the_parameter() {
    let r = rig().await;
    for (uri, field) in [
        ("/api/v1/queues?sort=name", "sort"),
        ("/api/v1/queues?order=up", "order"),
        ("/api/v1/queues?limit=0", "limit"),
        ("/api/v1/queues?limit=abc", "limit"),
        ("/api/v1/queues?limit=-1", "limit"),
        ("/api/v1/queues?limit=99999999999999999999999", "limit"),
        ("/api/v1/queues?limit=1&limit=2", "limit"),
        ("/api/v1/queues?colour=red", "colour"),
    ] {
        let (status, body) = get(&r.app, uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_eq!(body["field"], field, "{uri}: {body}");
    }
}

// ---------------------------------------------------------------------------------------------
// Health, metrics, OpenAPI, routing

#[tokio::test]
async fn health_before_the_first_check_says_only_that_the_process_is_up_and_then_serves_the_report()
{
    let r = rig().await;
    let (status, body) = get(&r.app, "/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["last_check"], Value::Null);

    submit(&r.exec, "health.a", 1..=2);
    r.health.check().await;
    let (status, body) = get(&r.app, "/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "healthy", "{body}");
    assert!(body["last_check"].is_string());
    assert_eq!(body["emergency_mode"], false);
    assert_eq!(body["checks"]["queue_length"]["value"], 1.0);
    assert_eq!(body["checks"]["queue_length"]["warning"], 100);
    assert_eq!(body["checks"]["dlq"]["status"], "healthy");
}

#[tokio::test]
async fn ready_is_a_503_with_the_reason_until_the_service_consumes_and_again_when_it_stops() {
    let r = rig().await;
    let (status, body) = get(&r.app, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_error(&body, "SERVICE_UNAVAILABLE");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("not ready since ") && e.ends_with(": starting")),
        "{body}"
    );
    r.readiness
        .not_ready("no RabbitMQ session (connection refused); trying again in 100 ms");
    let (_, body) = get(&r.app, "/ready").await;
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("connection refused")),
        "{body}"
    );

    r.readiness.ready();
    let (status, body) = get(&r.app, "/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready");
    assert!(body["since"].is_string(), "{body}");

    r.readiness.hold();
    let (status, body) = get(&r.app, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.ends_with(": shutting down")),
        "{body}"
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_http_series_labelled_by_route_never_by_raw_uri() {
    let r = rig().await;
    submit(&r.exec, "metrics.http.route", 1..=1);
    let _ = get(&r.app, "/api/v1/actions/metrics.http.route/queue-stats").await;
    let _ = get(&r.app, "/api/v1/actions/metrics.http.unseen/queue-stats").await;
    let _ = get(&r.app, "/no/such/path/metrics-http-raw").await;
    let (status, text) = get(&r.app, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().expect("text");
    let http_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("attune_http_"))
        .collect();
    assert!(
        http_lines.iter().any(
            |l| l.contains(r#"path="/api/v1/actions/{ref}/queue-stats""#)
                && l.contains(r#"status="200""#)
        ),
        "{http_lines:#?}"
    );
    assert!(
        http_lines
            .iter()
            .any(|l| l.contains(r#"path="unmatched""#) && l.contains(r#"status="404""#))
    );
    assert!(
        !http_lines
            .iter()
            .any(|l| l.contains("metrics.http") || l.contains("metrics-http-raw")),
        "no raw URI in labels: {http_lines:#?}"
    );
    // The queue gauges are refreshed for the scrape.
    assert!(
        text.lines()
            .any(|l| l.starts_with(r#"attune_queue_active_count{action="metrics.http.route"} 1"#)),
        "queue gauges present"
    );
}

#[tokio::test]
async fn metrics_for_named_actions_answer_busy_or_not_and_bad_names_are_a_400_naming_action() {
    let r = rig().await;
    submit(&r.exec, "metrics.named.one", 1..=2);
    // Answered by the action's actor, after the submission.
    let _ = get(&r.app, "/api/v1/actions/metrics.named.one/queue-stats").await;
    let (status, text) = get(
        &r.app,
        "/metrics/actions?action=metrics.named.one,metrics.named.never",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().expect("Prometheus text");
    assert!(
        text.lines()
            .any(|l| l == r#"attune_queue_length{action="metrics.named.one"} 1"#),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == r#"attune_queue_active_count{action="metrics.named.one"} 1"#),
        "{text}"
    );
    assert!(!text.contains("metrics.named.never"), "{text}");
    assert!(
        !text.contains("attune_http_"),
        "only the per-action families: {text}"
    );
    let too_many = vec!["a"; 1001]
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{a}{i}"))
        .collect::<Vec<_>>()
        .join(",");
    for query in [
        String::new(),
        "?action=".to_owned(),
        "?action=,,".to_owned(),
        "?action=ok.one,bad%20ref".to_owned(),
        format!("?action={too_many}"),
    ] {
        let (status, body) = get(&r.app, &format!("/metrics/actions{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_error(&body, "BAD_REQUEST");
        assert_eq!(body["field"], "action", "{query}: {body}");
    }
    let (status, body) = get(&r.app, "/metrics/actions?action=a&limit=1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "limit", "{body}");
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_with_its_method_and_nothing_else() {
    let r = rig().await;
    let (status, doc) = get(&r.app, "/api/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().expect("paths");
    for route in ROUTES {
        let op = &paths
            .get(route.path)
            .unwrap_or_else(|| panic!("{} missing from the document", route.path))
            [route.method.to_ascii_lowercase()];
        assert!(op.is_object(), "{} {} missing", route.method, route.path);
        assert_eq!(
            op.get("security").is_some(),
            route.admin,
            "{} {}: security marks admin routes",
            route.method,
            route.path
        );
        if route.admin {
            assert!(
                op["responses"]["401"].is_object(),
                "{} {}",
                route.method,
                route.path
            );
        }
    }
    for (path, ops) in paths {
        for method in ops.as_object().expect("operations").keys() {
            assert!(
                ROUTES
                    .iter()
                    .any(|r| r.path == path && r.method.eq_ignore_ascii_case(method)),
                "{method} {path} is documented but not served"
            );
        }
    }
}

#[tokio::test]
async fn every_listed_route_is_served_by_the_router_and_not_the_fallback() {
    let r = rig().await;
    for route in ROUTES {
        let method = Method::from_bytes(route.method.as_bytes()).expect("a method");
        let (status, body) = send(&r.app, req(method, &concrete(route.path), false, None)).await;
        let fell_through = status == StatusCode::METHOD_NOT_ALLOWED
            || body["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("no endpoint"));
        assert!(
            !fell_through,
            "{} {}: {status} {body}",
            route.method, route.path
        );
        if route.admin {
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{} {}",
                route.method,
                route.path
            );
        }
    }
}

#[tokio::test]
async fn an_unknown_path_is_a_json_404_and_a_wrong_method_a_json_405() {
    let r = rig().await;
    let (status, body) = get(&r.app, "/api/v2/nothing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "NOT_FOUND");
    let (status, body) = send(&r.app, req(Method::DELETE, "/health", false, None)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_error(&body, "METHOD_NOT_ALLOWED");
}

// ---------------------------------------------------------------------------------------------
// Authentication

#[tokio::test]
async fn every_admin_route_refuses_a_missing_token_with_a_json_401() {
    let r = rig().await;
    for route in ROUTES.iter().filter(|r| r.admin) {
        let method = Method::from_bytes(route.method.as_bytes()).expect("a method");
        let response = r
            .app
            .clone()
            .oneshot(req(method, &concrete(route.path), false, Some(json!({}))))
            .await
            .expect("answers");
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{}",
            route.path
        );
        assert!(
            response.headers().get(header::WWW_AUTHENTICATE).is_some(),
            "{}",
            route.path
        );
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        let body: Value = serde_json::from_slice(&bytes).expect("json");
        assert_error(&body, "UNAUTHORIZED");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("missing"))
        );
    }
}

#[tokio::test]
async fn every_admin_route_refuses_a_wrong_or_malformed_token() {
    let r = rig().await;
    for route in ROUTES.iter().filter(|r| r.admin) {
        for value in [
            "Bearer wrong-token",
            "Bearer s3cret-toke",
            "Bearer s3cret-token-longer",
            "Basic czNjcmV0LXRva2Vu",
            TOKEN,
            "Bearer",
        ] {
            let method = Method::from_bytes(route.method.as_bytes()).expect("a method");
            let request = Request::builder()
                .method(method)
                .uri(concrete(route.path))
                .header(header::AUTHORIZATION, value)
                .body(Body::empty())
                .expect("request");
            let (status, body) = send(&r.app, request).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{} with {value:?}",
                route.path
            );
            assert_error(&body, "UNAUTHORIZED");
            assert!(
                !body.to_string().contains(TOKEN),
                "the token is never echoed"
            );
        }
    }
}

#[tokio::test]
async fn with_no_token_configured_every_admin_route_refuses_and_says_none_is_configured() {
    let r = rig_with(Options {
        token: None,
        ..Options::default()
    })
    .await;
    for route in ROUTES.iter().filter(|r| r.admin) {
        let method = Method::from_bytes(route.method.as_bytes()).expect("a method");
        let (status, body) = send(&r.app, req(method, &concrete(route.path), true, None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{}", route.path);
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("no admin token is configured")),
            "{body}"
        );
    }
    // Reading stays open.
    let (status, _) = get(&r.app, "/api/v1/queues").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn the_scheme_is_case_insensitive() {
    let r = rig().await;
    let request = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/purge?dry_run=true")
        .header(header::AUTHORIZATION, format!("bearer {TOKEN}"))
        .body(Body::empty())
        .expect("request");
    let (status, body) = send(&r.app, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

// ---------------------------------------------------------------------------------------------
// Policies

#[tokio::test]
async fn a_policy_put_takes_effect_at_once_and_reads_back() {
    let r = rig().await;
    submit(&r.exec, "policy.live", 1..=5);
    let (status, body) = send(
        &r.app,
        req(
            Method::PUT,
            "/api/v1/actions/policy.live/policy",
            true,
            Some(json!({"concurrency_limit": 3, "rate_limit": {"max": 10, "per_seconds": 1}, "enabled": true})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["concurrency_limit"], 3);
    assert_eq!(
        body["data"]["rate_limit"],
        json!({"max": 10, "per_seconds": 1})
    );
    let (_, stats) = get(&r.app, "/api/v1/actions/policy.live/queue-stats").await;
    assert_eq!(stats["data"]["max_concurrent"], 3);
    assert_eq!(
        stats["data"]["active_count"], 3,
        "the raised limit admitted at once"
    );
    let (_, policy) = get(&r.app, "/api/v1/actions/policy.live/policy").await;
    assert_eq!(policy["data"]["concurrency_limit"], 3);
    assert_eq!(policy["data"]["enabled"], true);

    let (status, body) = send(
        &r.app,
        req(
            Method::PUT,
            "/api/v1/actions/policy.live/policy",
            true,
            Some(json!({"concurrency_limit": 1, "rate_limit": null, "enabled": false})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["rate_limit"], Value::Null);
    let p = r.exec.policy(&action("policy.live"));
    assert_eq!(
        (p.concurrency_limit.get(), p.rate_limit, p.enabled),
        (1, None, false)
    );
}

#[tokio::test]
async fn a_policy_put_changes_only_the_fields_it_gives_and_null_removes_the_rate_limit() {
    let r = rig().await;
    let uri = "/api/v1/actions/policy.partial/policy";
    let a = action("policy.partial");
    submit(&r.exec, "policy.partial", 1..=5);
    let put = |body: Value| send(&r.app, req(Method::PUT, uri, true, Some(body)));
    let (status, body) = put(json!({
        "concurrency_limit": 1,
        "rate_limit": {"max": 10, "per_seconds": 60},
        "enabled": false
    }))
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ten_a_minute = Some(RateLimit {
        max: NonZeroU32::new(10).expect("10"),
        per: Duration::from_secs(60),
    });

    // A lone limit change keeps the action paused and its rate limit.
    let (status, body) = put(json!({"concurrency_limit": 3})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"],
        json!({
            "action_ref": "policy.partial",
            "concurrency_limit": 3,
            "rate_limit": {"max": 10, "per_seconds": 60},
            "enabled": false
        }),
        "the answer is the whole policy in force"
    );
    let p = r.exec.policy(&a);
    assert_eq!(
        (p.concurrency_limit.get(), p.rate_limit, p.enabled),
        (3, ten_a_minute, false)
    );
    let (_, stats) = get(&r.app, "/api/v1/actions/policy.partial/queue-stats").await;
    // The first execution went before the pause; the raised limit admitted nothing more.
    assert_eq!(
        (
            &stats["data"]["max_concurrent"],
            &stats["data"]["active_count"]
        ),
        (&json!(3), &json!(1)),
        "{stats}"
    );

    // A rate limit left out is kept; given as null it is removed.
    let (status, body) = put(json!({"enabled": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(r.exec.policy(&a).rate_limit, ten_a_minute);
    let (_, stats) = get(&r.app, "/api/v1/actions/policy.partial/queue-stats").await;
    assert_eq!(
        stats["data"]["active_count"], 3,
        "resumed at the kept limit"
    );
    let (status, body) = put(json!({"rate_limit": null})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["rate_limit"], Value::Null);
    let p = r.exec.policy(&a);
    assert_eq!(
        (p.concurrency_limit.get(), p.rate_limit, p.enabled),
        (3, None, true)
    );

    // An empty body is refused with a message that says what to send, and changes nothing.
    let (status, body) = put(json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_error(&body, "BAD_REQUEST");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("at least one of concurrency_limit")),
        "{body}"
    );
    assert_eq!(r.exec.policy(&a), p);
}

#[tokio::test]
async fn bad_policy_bodies_are_a_400_naming_the_field_and_change_nothing() {
    let r = rig().await;
    let uri = "/api/v1/actions/policy.bad/policy";
    let cases: Vec<(Value, Option<&str>)> = vec![
        (
            json!({"concurrency_limit": 0, "enabled": true}),
            Some("concurrency_limit"),
        ),
        (
            json!({"concurrency_limit": "3", "enabled": true}),
            Some("concurrency_limit"),
        ),
        (
            json!({"concurrency_limit": -1, "enabled": true}),
            Some("concurrency_limit"),
        ),
        (
            json!({"concurrency_limit": 1.5, "enabled": true}),
            Some("concurrency_limit"),
        ),
        (
            json!({"concurrency_limit": 4294967296_u64, "enabled": true}),
            Some("concurrency_limit"),
        ),
        // Larger than the action table's INT can keep.
        (
            json!({"concurrency_limit": 2147483648_u64, "enabled": true}),
            Some("concurrency_limit"),
        ),
        (
            json!({"concurrency_limit": 2, "enabled": true, "rate_limit": {"max": 2147483648_u64, "per_seconds": 1}}),
            Some("rate_limit.max"),
        ),
        // Nothing to change, and null for a field that cannot be "none".
        (json!({}), None),
        (
            json!({"concurrency_limit": null}),
            Some("concurrency_limit"),
        ),
        (json!({"enabled": null}), Some("enabled")),
        (
            json!({"rate_limit": {"max": 0, "per_seconds": 1}}),
            Some("rate_limit.max"),
        ),
        (
            json!({"concurrency_limit": 2, "enabled": "yes"}),
            Some("enabled"),
        ),
        (
            json!({"concurrency_limit": 2, "enabled": true, "colour": "red"}),
            None,
        ),
        (
            json!({"concurrency_limit": 2, "enabled": true, "rate_limit": {"max": 0, "per_seconds": 1}}),
            Some("rate_limit.max"),
        ),
        (
            json!({"concurrency_limit": 2, "enabled": true, "rate_limit": {"max": 1, "per_seconds": 0}}),
            Some("rate_limit.per_seconds"),
        ),
        (
            json!({"concurrency_limit": 2, "enabled": true, "rate_limit": {"max": 1, "per_seconds": 18446744073709551615_u64}}),
            Some("rate_limit.per_seconds"),
        ),
        (
            json!({"concurrency_limit": 2, "enabled": true, "rate_limit": {"max": 1}}),
            Some("rate_limit"),
        ),
        (json!([1, 2]), None),
        (json!(null), None),
    ];
    for (body, field) in cases {
        let (status, answer) = send(&r.app, req(Method::PUT, uri, true, Some(body.clone()))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_error(&answer, "BAD_REQUEST");
        if let Some(field) = field {
            assert_eq!(answer["field"], field, "{body}: {answer}");
        }
    }
    for raw in [
        "{not json",
        "",
        "{\"concurrency_limit\": 2, \"enabled\": true} trailing",
    ] {
        let request = Request::builder()
            .method(Method::PUT)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(raw))
            .expect("request");
        let (status, answer) = send(&r.app, request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{raw:?}: {answer}");
        assert_error(&answer, "BAD_REQUEST");
    }
    let (status, answer) = send(
        &r.app,
        req(
            Method::PUT,
            "/api/v1/actions/bad%20ref/policy",
            true,
            Some(json!({"concurrency_limit": 2, "enabled": true})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["field"], "action_ref");
    assert_eq!(
        r.exec.policy(&action("policy.bad")),
        ActionPolicy::default(),
        "nothing changed"
    );
}

#[tokio::test]
async fn a_body_without_a_json_content_type_is_a_415_and_an_oversized_one_a_413() {
    let r = rig_with(Options {
        max_body_bytes: 256,
        ..Options::default()
    })
    .await;
    let uri = "/api/v1/actions/policy.size/policy";
    let request = Request::builder()
        .method(Method::PUT)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::from(r#"{"concurrency_limit": 2, "enabled": true}"#))
        .expect("request");
    let (status, body) = send(&r.app, request).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    assert_error(&body, "UNSUPPORTED_MEDIA_TYPE");

    let padding = " ".repeat(1024);
    let big = format!(r#"{{"concurrency_limit": 2,{padding} "enabled": true}}"#);
    let request = Request::builder()
        .method(Method::PUT)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(big))
        .expect("request");
    let (status, body) = send(&r.app, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_error(&body, "PAYLOAD_TOO_LARGE");
    assert_eq!(
        r.exec.policy(&action("policy.size")),
        ActionPolicy::default()
    );
}

/// A store that always fails.
struct BrokenStore;

impl PolicyStore for BrokenStore {
    fn apply<'a>(
        &'a self,
        _executor: &'a Executor,
        _action: &'a ActionRef,
        _patch: PolicyPatch,
    ) -> BoxFuture<'a, Result<ActionPolicy, HookError>> {
        Box::pin(async { Err(HookError("database is down".to_owned())) })
    }
}

#[tokio::test]
async fn a_policy_the_store_cannot_keep_is_a_503_and_is_not_applied() {
    let r = rig_with(Options {
        policies: Arc::new(BrokenStore),
        ..Options::default()
    })
    .await;
    let (status, body) = send(
        &r.app,
        req(
            Method::PUT,
            "/api/v1/actions/policy.store/policy",
            true,
            Some(json!({"concurrency_limit": 9, "enabled": true})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("nothing changed"))
    );
    assert_eq!(
        r.exec.policy(&action("policy.store")).concurrency_limit,
        NonZeroU32::MIN
    );
}

// ---------------------------------------------------------------------------------------------
// Cancel

#[tokio::test]
async fn cancel_answers_200_for_a_waiting_execution_409_for_a_running_one_and_404_otherwise() {
    let r = rig().await;
    submit(&r.exec, "cancel.a", 101..=103);
    let (status, body) = send(
        &r.app,
        req(Method::POST, "/api/v1/executions/102/cancel", true, None),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"],
        json!({"execution_id": 102, "status": "canceled"})
    );
    let (status, body) = send(
        &r.app,
        req(Method::POST, "/api/v1/executions/101/cancel", true, None),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_error(&body, "CONFLICT");
    let (status, body) = send(
        &r.app,
        req(Method::POST, "/api/v1/executions/999/cancel", true, None),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = send(
        &r.app,
        req(Method::POST, "/api/v1/executions/102/cancel", true, None),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "already canceled");
    let (_, stats) = get(&r.app, "/api/v1/actions/cancel.a/queue-stats").await;
    assert_eq!(stats["data"]["queue_length"], 1);
    assert_eq!(stats["data"]["total_canceled"], 1);
}

#[tokio::test]
async fn cancel_with_an_id_that_is_not_an_execution_id_is_a_400_naming_execution_id() {
    let r = rig().await;
    for id in [
        "0",
        "abc",
        "-1",
        "1.5",
        "9223372036854775808",
        "99999999999999999999999",
    ] {
        let (status, body) = send(
            &r.app,
            req(
                Method::POST,
                &format!("/api/v1/executions/{id}/cancel"),
                true,
                None,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{id}: {body}");
        assert_eq!(body["field"], "execution_id", "{id}");
    }
}

// ---------------------------------------------------------------------------------------------
// Purge

#[tokio::test]
async fn a_manual_purge_runs_one_cycle_and_reports_it() {
    let r = rig().await;
    submit(&r.exec, "purge.http", 1..=2);
    let (status, body) = send(
        &r.app,
        req(Method::POST, "/api/v1/purge?dry_run=true", true, None),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["dry_run"], true);
    assert_eq!(body["data"]["trigger"], "manual");
    assert_eq!(body["data"]["purged"], 0, "nothing is old yet");
    assert_eq!(body["data"]["ledger"], Value::Null);
    let (status, body) = send(
        &r.app,
        req(Method::POST, "/api/v1/purge?dry_run=maybe", true, None),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "dry_run");
    let (status, body) = send(&r.app, req(Method::POST, "/api/v1/purge", true, None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"]["dry_run"], false,
        "purge.dry_run is the default"
    );
}

/// A ledger purge that waits until told to finish, to hold a cycle open.
struct SlowLedger {
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl LedgerPurge for SlowLedger {
    fn purge<'a>(
        &'a self,
        _order: LedgerPurgeOrder,
    ) -> BoxFuture<'a, Result<Option<LedgerPurged>, HookError>> {
        Box::pin(async move {
            self.entered.notify_one();
            self.release.notified().await;
            Ok(Some(LedgerPurged::default()))
        })
    }
}

#[tokio::test]
async fn a_manual_purge_while_a_cycle_runs_is_a_409_and_cycles_never_overlap() {
    let ledger = Arc::new(SlowLedger {
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
    });
    let r = rig_with(Options {
        ledger: ledger.clone(),
        ..Options::default()
    })
    .await;
    let app = r.app.clone();
    let first = tokio::spawn(async move {
        send(
            &app,
            req(Method::POST, "/api/v1/purge?dry_run=true", true, None),
        )
        .await
    });
    ledger.entered.notified().await;
    let (status, body) = send(
        &r.app,
        req(Method::POST, "/api/v1/purge?dry_run=true", true, None),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_error(&body, "CONFLICT");
    ledger.release.notify_one();
    let (status, body) = first.await.expect("the first purge finishes");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["data"]["ledger"],
        json!({"completed_executions": 0, "stale_stats": 0, "old_snapshots": 0,
               "old_health_checks": 0})
    );
}

// ---------------------------------------------------------------------------------------------
// DLQ input checks (the broker side is in ops_dlq.rs)

#[tokio::test]
async fn replay_bodies_must_name_exactly_one_selection_within_bounds() {
    let r = rig().await;
    let cases: Vec<(Value, Option<&str>)> = vec![
        (json!({}), None),
        (json!({"execution_ids": [1], "limit": 1}), None),
        (json!({"execution_ids": []}), Some("execution_ids")),
        (json!({"execution_ids": [0]}), Some("execution_ids")),
        (json!({"execution_ids": ["1"]}), Some("execution_ids[0]")),
        (
            json!({"execution_ids": (1..=1001).collect::<Vec<u64>>()}),
            Some("execution_ids"),
        ),
        (json!({"limit": 0}), Some("limit")),
        (json!({"limit": 1001}), Some("limit")),
        (json!({"limit": -3}), Some("limit")),
        (json!({"limit": 1, "force": true}), None),
    ];
    for (body, field) in cases {
        let (status, answer) = send(
            &r.app,
            req(Method::POST, "/api/v1/dlq/replay", true, Some(body.clone())),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        if let Some(field) = field {
            assert_eq!(answer["field"], field, "{body}: {answer}");
        }
    }
}

#[tokio::test]
async fn dlq_endpoints_with_the_dlq_disabled_say_so_with_a_503() {
    let r = rig().await;
    for (method, uri, body) in [
        (Method::GET, "/api/v1/dlq", None),
        (Method::GET, "/api/v1/dlq/stats", None),
        (
            Method::POST,
            "/api/v1/dlq/replay",
            Some(json!({"limit": 1})),
        ),
    ] {
        let (status, answer) = send(&r.app, req(method, uri, true, body)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("dlq.enabled"))
        );
    }
    let (status, answer) = send(&r.app, req(Method::GET, "/api/v1/dlq?limit=0", true, None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["field"], "limit");
}

// ---------------------------------------------------------------------------------------------
// Hostile input in bulk

#[tokio::test]
async fn no_malformed_request_gets_a_500() {
    let r = rig().await;
    let weird_paths = [
        "/api/v1/actions//queue-stats",
        "/api/v1/actions/%00/queue-stats",
        "/api/v1/actions/..%2F..%2Fetc/queue-stats",
        "/api/v1/actions/a.b.c/queue-stats?x",
        "/api/v1/actions/a/queue-stats/extra",
        "/api/v1/queues?sort",
        "/api/v1/queues?%ZZ=1",
        "/api/v1/executions//cancel",
        "/api/v1/executions/%FF/cancel",
        "/api/v1/dlq?limit=%FF",
        "/api/v1/dlq?queue_from=&error_class=%FF",
        "/api/v1/dlq/discard",
        "/api/v1/overview?x=1",
        "/api/v1/actions?refs=a,,%00",
        "/api/v1/actions?refs=a&sort=health",
        "/api/v1/actions?limit=0&offset=-1",
        "/api/v1/actions/%00",
        "/api/v1/actions/a?waiting=-1",
        "/api/v1/purge?dry_run",
        "//health",
        "/metrics?x=1",
        "/metrics/actions",
        "/metrics/actions?action=",
        "/metrics/actions?action=a,%00",
        "/metrics/actions?action=a&action=b",
    ];
    for path in weird_paths {
        for method in [Method::GET, Method::POST, Method::PUT] {
            for auth in [false, true] {
                for body in [
                    None,
                    Some(json!({"x": [1, {"y": null}]})),
                    Some(json!("text")),
                ] {
                    let (status, answer) =
                        send(&r.app, req(method.clone(), path, auth, body)).await;
                    assert!(
                        status.is_success() || status.is_client_error(),
                        "{method} {path}: {status} {answer}"
                    );
                    if status.is_client_error() {
                        assert!(
                            answer["code"].is_string(),
                            "{method} {path}: JSON error {answer}"
                        );
                    }
                }
            }
        }
    }
}
