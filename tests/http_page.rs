//! The JSON API behind the operations page, through `router(state).oneshot(…)` with the real
//! core and in-memory ports: the overview (its history's rates and queue waits with paused
//! time), the actions table over 10,000 actions (filter, every sort, paging, `refs`), each
//! row's health flag, and one action's detail (the head of its queue, what runs, its last
//! ends).
//!
//! The DLQ parts need RabbitMQ and live in `ops_dlq.rs`; shared mode needs Postgres and lives
//! in `pg_shared.rs`; the service with its sampler task running is in `page_service.rs`.

mod support;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use fifo_executor::config::HealthThresholds;
use fifo_executor::core::memory::{ChannelDispatcher, DiscardSink, LatestStats};
use fifo_executor::core::{ActionPolicy, Executor, Ports, QueueSettings, RateLimit, UniformPolicy};
use fifo_executor::http;
use fifo_executor::model::{
    ActionRef, CancelRequest, Completion, EndStatus, ExecutionId, Payload, Submission,
};
use fifo_executor::ops::health::HealthMonitor;
use fifo_executor::ops::history::Sampler;
use fifo_executor::ops::hooks::NoHealthStore;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Page {
    app: Router,
    exec: Arc<Executor>,
    stats: Arc<LatestStats>,
    health: Arc<HealthMonitor>,
    history: Arc<Sampler>,
}

/// A router over a fresh core whose actions run `limit` at a time, judged by `thresholds`.
async fn page(limit: u32, thresholds: HealthThresholds) -> Page {
    let stats = Arc::new(LatestStats::default());
    let exec = Arc::new(
        Executor::start(
            QueueSettings::default(),
            Ports {
                dispatcher: Arc::new(ChannelDispatcher::new().0),
                sink: Arc::new(DiscardSink),
                observer: stats.clone(),
            },
            Arc::new(UniformPolicy(policy(limit))),
        )
        .await
        .expect("the executor starts"),
    );
    let health = Arc::new(HealthMonitor::new(
        exec.clone(),
        None,
        thresholds,
        false,
        Arc::new(NoHealthStore),
    ));
    let state = support::app_state(exec.clone(), stats.clone(), health.clone(), None);
    let history = state.history.clone();
    let app = http::router(state);
    Page {
        app,
        exec,
        stats,
        health,
        history,
    }
}

fn policy(limit: u32) -> ActionPolicy {
    ActionPolicy {
        concurrency_limit: NonZeroU32::new(limit).expect("a limit of at least 1"),
        ..ActionPolicy::default()
    }
}

fn action(s: &str) -> ActionRef {
    ActionRef::parse(s).expect("valid ref")
}

fn submit(exec: &Executor, a: &ActionRef, ids: impl IntoIterator<Item = ExecutionId>) {
    exec.submit(
        a,
        ids.into_iter()
            .map(|id| Submission::new(id, Payload::empty_object()))
            .collect(),
    );
}

fn complete(exec: &Executor, id: ExecutionId, status: EndStatus) {
    exec.complete(vec![Completion::new(id, status)]);
}

/// Waits until the action's actor has handled everything sent to it so far.
async fn settled(exec: &Executor, a: &ActionRef) {
    exec.stats(a).await.expect("the actor answers");
}

async fn get(app: &Router, uri: &str) -> (StatusCode, Value) {
    let response = app
        .clone()
        .oneshot(
            Request::builder()
                .uri(uri)
                .body(Body::empty())
                .expect("a request"),
        )
        .await
        .expect("the router answers");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("a body");
    (status, serde_json::from_slice(&bytes).expect("JSON"))
}

async fn ok(app: &Router, uri: &str) -> Value {
    let (status, body) = get(app, uri).await;
    assert_eq!(status, StatusCode::OK, "{uri}: {body}");
    body
}

fn refs(body: &Value) -> Vec<String> {
    body["data"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["action_ref"].as_str().expect("a ref").to_owned())
        .collect()
}

fn close(a: &Value, b: f64) -> bool {
    a.as_f64().is_some_and(|a| (a - b).abs() < 1e-9)
}

// ---------------------------------------------------------------------------------------------
// Overview

#[tokio::test]
async fn the_overview_names_the_instance_and_serves_health_totals_and_history() {
    let p = page(1, HealthThresholds::default()).await;
    let body = ok(&p.app, "/api/v1/overview").await;
    let d = &body["data"];
    assert_eq!(d["instance"], "test");
    assert_eq!(d["mode"], "single");
    assert!(
        d["now"]
            .as_str()
            .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()),
        "{d}"
    );
    assert_eq!(d["health"], Value::Null, "no check has run");
    assert_eq!(d["totals"]["queued"], 0);
    assert_eq!(d["totals"]["dlq_size"], Value::Null, "the DLQ is disabled");
    assert_eq!(
        d["history"].as_array().map(Vec::len),
        Some(1),
        "the first request takes the first sample"
    );

    let a = action("ov.a");
    submit(&p.exec, &a, 1..=3);
    settled(&p.exec, &a).await;
    p.health.check().await;
    p.history.sample().await;
    let body = ok(&p.app, "/api/v1/overview").await;
    let d = &body["data"];
    assert_eq!(d["health"]["status"], "healthy");
    assert_eq!(d["health"]["checks"]["queue_length"]["value"], 2.0);
    assert_eq!(d["health"]["checks"]["queue_length"]["warning"], 100);
    let t = &d["totals"];
    assert_eq!(
        (&t["actions"], &t["queued"], &t["running"]),
        (&json!(1), &json!(2), &json!(1))
    );
    let history = d["history"].as_array().expect("history");
    assert_eq!(history.len(), 2);
    let last = &history[1];
    assert_eq!((&last["queued"], &last["running"]), (&json!(2), &json!(1)));
    assert!(
        last.get("dlq_size").is_none() && last.get("actions").is_none(),
        "history entries carry the chart's fields only: {last}"
    );
    p.exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn the_history_s_rates_and_queue_waits_are_what_happened_between_two_samples() {
    let p = page(1, HealthThresholds::default()).await;
    let a = action("rate.a");
    p.history.sample().await;
    // 1 runs at once (waited 0 s); 2 after 2 s, 3 after 4 s.
    submit(&p.exec, &a, 1..=3);
    settled(&p.exec, &a).await;
    tokio::time::advance(Duration::from_secs(2)).await;
    complete(&p.exec, 1, EndStatus::Succeeded);
    settled(&p.exec, &a).await;
    tokio::time::advance(Duration::from_secs(2)).await;
    complete(&p.exec, 2, EndStatus::Failed);
    settled(&p.exec, &a).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let s = p.history.sample().await;
    assert!((s.dispatched_per_second - 3.0 / 5.0).abs() < 1e-9, "{s:?}");
    assert!((s.completed_per_second - 2.0 / 5.0).abs() < 1e-9, "{s:?}");
    assert_eq!(s.queue_wait_mean_seconds, Some(2.0));
    assert_eq!(s.queue_wait_max_seconds, Some(4.0));
    assert_eq!((s.queued, s.running, s.actions), (0, 1, 1));

    // Nothing admitted in the next interval: no wait to speak of, and no throughput.
    tokio::time::advance(Duration::from_secs(5)).await;
    let body = ok(&p.app, "/api/v1/overview").await;
    assert_eq!(
        body["data"]["history"].as_array().map(Vec::len),
        Some(2),
        "the overview serves the kept samples without taking one"
    );
    let quiet = p.history.sample().await;
    assert_eq!(quiet.dispatched_per_second, 0.0);
    assert_eq!(quiet.queue_wait_mean_seconds, None);
    assert_eq!(quiet.queue_wait_max_seconds, None);
    let body = ok(&p.app, "/api/v1/overview").await;
    let history = body["data"]["history"].as_array().expect("history").clone();
    assert_eq!(history.len(), 3);
    assert!(close(&history[1]["dispatched_per_second"], 0.6));
    assert_eq!(history[1]["queue_wait_max_seconds"], 4.0);
    assert_eq!(history[2]["queue_wait_mean_seconds"], Value::Null);
    assert_eq!(body["data"]["totals"]["dispatched_per_second"], 0.0);
    p.exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn the_history_keeps_the_last_fifteen_minutes() {
    let p = page(1, HealthThresholds::default()).await;
    for _ in 0..200 {
        p.history.sample().await;
        tokio::time::advance(Duration::from_secs(5)).await;
    }
    let history = p.history.history();
    assert_eq!(history.len(), fifo_executor::ops::history::HISTORY_SAMPLES);
    let span = history[history.len() - 1].at - history[0].at;
    assert_eq!(span, chrono::Duration::seconds(179 * 5));
    p.exec.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------------------------
// The actions table

/// What the 10,000-action test set up for action `i`.
struct Made {
    name: String,
    queued: usize,
    limit: u32,
    /// Executions allowed per second, when rate-limited.
    rate: Option<f64>,
    enabled: bool,
}

fn made(i: usize) -> Made {
    let limited = i % 1000 == 7;
    Made {
        name: format!("svc{i:05}.act"),
        // Limit 1 and (i % 7) + 1 submissions: i % 7 wait. A disabled action gets one
        // submission, rejected (which is what makes it report counters at all).
        queued: if limited || i % 2000 == 11 { 0 } else { i % 7 },
        limit: if limited { 5 } else { 1 },
        rate: (i % 500 == 3).then(|| (i % 9 + 1) as f64 / 60.0),
        enabled: i % 2000 != 11,
    }
}

const MANY: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_over_ten_thousand_actions_filters_sorts_and_pages_without_asking_the_actors() {
    let p = page(
        1,
        HealthThresholds {
            queue_length_warning: 5,
            ..HealthThresholds::default()
        },
    )
    .await;
    let all: Vec<Made> = (0..MANY).map(made).collect();
    let mut next_id = 1;
    let mut expected_queued = 0;
    for m in &all {
        let a = action(&m.name);
        if m.limit != 1 || m.rate.is_some() || !m.enabled {
            p.exec
                .set_policy(
                    &a,
                    ActionPolicy {
                        concurrency_limit: NonZeroU32::new(m.limit).expect("limit"),
                        rate_limit: m.rate.map(|r| RateLimit {
                            max: NonZeroU32::new((r * 60.0).round() as u32).expect("max"),
                            per: Duration::from_secs(60),
                        }),
                        enabled: m.enabled,
                    },
                )
                .expect("policy set");
        }
        let n = (m.queued + 1) as u64;
        submit(&p.exec, &a, next_id..next_id + n);
        next_id += n;
        expected_queued += m.queued as u64;
    }
    support::poll_until(Duration::from_secs(60), "every action reported", || async {
        let s = p.stats.sums();
        s.actions == MANY && s.queued == expected_queued
    })
    .await;

    let started = std::time::Instant::now();
    let body = ok(&p.app, "/api/v1/actions").await;
    eprintln!(
        "a default page over {MANY} actions took {:?} (debug build)",
        started.elapsed()
    );
    assert_eq!(
        (&body["total"], &body["offset"], &body["limit"]),
        (&json!(MANY), &json!(0), &json!(50))
    );
    assert_eq!(
        refs(&body),
        (0..50).map(|i| made(i).name).collect::<Vec<_>>()
    );
    let row = &body["data"][7];
    assert_eq!(row["action_ref"], "svc00007.act");
    assert_eq!(row["max_concurrent"], 5);
    assert_eq!(row["queue_length"], 0);
    let row = &body["data"][3];
    assert_eq!(row["rate_limit"], json!({"max": 4, "per_seconds": 60}));
    assert_eq!(row["queue_length"], 3);
    assert_eq!(row["active_count"], 1);
    assert!(row["oldest_age_seconds"].as_f64().is_some_and(|s| s >= 0.0));
    assert!(row["oldest_enqueued_at"].is_string() && row["last_updated"].is_string());
    assert_eq!(
        (&row["enabled"], &row["health"]),
        (&json!(true), &json!("ok"))
    );

    let tail = ok(&p.app, "/api/v1/actions?offset=9990&limit=50").await;
    assert_eq!(
        refs(&tail),
        (9990..MANY).map(|i| made(i).name).collect::<Vec<_>>()
    );
    let beyond = ok(&p.app, "/api/v1/actions?offset=20000").await;
    assert_eq!(
        (beyond["total"].as_u64(), refs(&beyond).len()),
        (Some(10_000), 0)
    );

    let found = ok(&p.app, "/api/v1/actions?q=SVC0001&limit=500").await;
    assert_eq!(found["total"], 10);
    assert_eq!(
        refs(&found),
        (10..20).map(|i| made(i).name).collect::<Vec<_>>()
    );

    // Every sort, both ways, read page by page, against the order the test set up.
    let level = |m: &Made| -> u8 {
        if m.queued > 5 {
            2 // queue_long
        } else if !m.enabled {
            1 // disabled
        } else {
            0
        }
    };
    type Key = Box<dyn Fn(&Made) -> f64>;
    let sorts: Vec<(&str, Key)> = vec![
        ("queue_length", Box::new(|m: &Made| m.queued as f64)),
        (
            "active_count",
            Box::new(|m: &Made| f64::from(u8::from(m.enabled))),
        ),
        ("max_concurrent", Box::new(|m: &Made| f64::from(m.limit))),
        (
            "oldest",
            Box::new(|m: &Made| f64::from(u8::from(m.queued > 0))),
        ),
        (
            "rate_limit",
            Box::new(|m: &Made| m.rate.unwrap_or(f64::INFINITY)),
        ),
        (
            "enabled",
            Box::new(|m: &Made| f64::from(u8::from(m.enabled))),
        ),
        ("health", Box::new(move |m: &Made| f64::from(level(m)))),
    ];
    for (sort, key) in &sorts {
        for order in ["asc", "desc"] {
            let mut got = Vec::with_capacity(MANY);
            for offset in (0..MANY).step_by(500) {
                let page = ok(
                    &p.app,
                    &format!("/api/v1/actions?sort={sort}&order={order}&offset={offset}&limit=500"),
                )
                .await;
                got.extend(refs(&page));
            }
            if *sort == "oldest" {
                // Ages differ by when each action's first execution came; only the split
                // between actions with and without waiting executions is known here.
                let waits: Vec<bool> = got
                    .iter()
                    .map(|r| all[r[3..8].parse::<usize>().expect("index")].queued > 0)
                    .collect();
                let split = waits.iter().position(|w| *w == (order == "asc"));
                let flips = waits.windows(2).filter(|w| w[0] != w[1]).count();
                assert!(split.is_some() && flips == 1, "oldest {order}: one split");
                continue;
            }
            let mut want: Vec<&Made> = all.iter().collect();
            want.sort_by(|a, b| {
                let by = key(a).total_cmp(&key(b));
                let by = if order == "desc" { by.reverse() } else { by };
                by.then_with(|| a.name.cmp(&b.name))
            });
            let want: Vec<String> = want.iter().map(|m| m.name.clone()).collect();
            assert!(got == want, "sort={sort}&order={order} differs");
        }
    }
    let by_ref = ok(&p.app, "/api/v1/actions?sort=action_ref&order=desc&limit=3").await;
    assert_eq!(
        refs(&by_ref),
        vec!["svc09999.act", "svc09998.act", "svc09997.act"]
    );
    let flagged = ok(&p.app, "/api/v1/actions?sort=health&order=desc&limit=1").await;
    assert_eq!(flagged["data"][0]["health"], "queue_long");
    assert_eq!(flagged["data"][0]["flags"], json!(["queue_long"]));
    let off = ok(&p.app, "/api/v1/actions?refs=svc00011.act").await;
    assert_eq!(off["data"][0]["health"], "disabled");
    assert_eq!(off["data"][0]["enabled"], false);

    // A refresh of the rows shown: in the order asked, unknown and repeated refs left out.
    let started = std::time::Instant::now();
    let rows = ok(
        &p.app,
        "/api/v1/actions?refs=svc00003.act,no.such.action,svc00001.act,svc00003.act",
    )
    .await;
    eprintln!("a refs refresh of 2 rows took {:?}", started.elapsed());
    assert_eq!(refs(&rows), vec!["svc00003.act", "svc00001.act"]);
    assert_eq!(
        (&rows["total"], &rows["offset"], &rows["limit"]),
        (&json!(2), &json!(0), &json!(3))
    );
    assert_eq!(rows["data"][0]["queue_length"], 3);
    p.exec.shutdown(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn bad_table_parameters_are_a_400_naming_the_parameter() {
    let p = page(1, HealthThresholds::default()).await;
    let many: Vec<String> = (0..501).map(|i| format!("a{i}")).collect();
    let too_many = format!("/api/v1/actions?refs={}", many.join(","));
    for (uri, field) in [
        ("/api/v1/actions?sort=color", "sort"),
        ("/api/v1/actions?order=up", "order"),
        ("/api/v1/actions?limit=0", "limit"),
        ("/api/v1/actions?limit=501", "limit"),
        ("/api/v1/actions?offset=-1", "offset"),
        ("/api/v1/actions?page=2", "page"),
        ("/api/v1/actions?refs=a,b%20c", "refs"),
        ("/api/v1/actions?refs=,", "refs"),
        (too_many.as_str(), "refs"),
        ("/api/v1/actions?refs=a&limit=5", "limit"),
        ("/api/v1/actions?refs=a&q=b", "q"),
        ("/api/v1/actions/a.b?waiting=501", "waiting"),
        ("/api/v1/actions/a.b?running=1", "running"),
        ("/api/v1/actions/bad%20ref", "action_ref"),
        ("/api/v1/overview?x=1", "x"),
    ] {
        let (status, body) = get(&p.app, uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_eq!(body["field"], field, "{uri}: {body}");
    }
    let (status, body) = get(&p.app, "/api/v1/actions/never.seen").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["code"], "NOT_FOUND");
    let empty = ok(&p.app, "/api/v1/actions?q=").await;
    assert_eq!((&empty["total"], refs(&empty).len()), (&json!(0), 0));
    p.exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn rows_are_flagged_by_the_health_check_s_thresholds_and_its_stuck_counts() {
    let p = page(
        1,
        HealthThresholds {
            queue_length_warning: 1,
            queue_length_critical: 3,
            oldest_age_warning_seconds: 10,
            oldest_age_critical_seconds: 20,
            stuck_age_seconds: 15,
            stalled_seconds: 100,
            ..HealthThresholds::default()
        },
    )
    .await;
    let (calm, long, stuck) = (action("f.calm"), action("f.long"), action("f.stuck"));
    submit(&p.exec, &calm, [1]);
    submit(&p.exec, &long, 2..=4);
    submit(&p.exec, &stuck, [5]);
    for a in [&calm, &long, &stuck] {
        settled(&p.exec, a).await;
    }
    let health_of = |body: &Value| -> Vec<(String, Value)> {
        body["data"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                (
                    r["action_ref"].as_str().unwrap_or_default().to_owned(),
                    r["flags"].clone(),
                )
            })
            .collect()
    };
    let body = ok(&p.app, "/api/v1/actions").await;
    assert_eq!(
        health_of(&body),
        vec![
            ("f.calm".to_owned(), json!([])),
            ("f.long".to_owned(), json!(["queue_long"])),
            ("f.stuck".to_owned(), json!([])),
        ]
    );
    // 16 s later: f.long's oldest waits too long and every running one is stuck, but the
    // table knows stuck executions only from the health check.
    tokio::time::advance(Duration::from_secs(16)).await;
    let body = ok(&p.app, "/api/v1/actions?sort=health&order=desc").await;
    assert_eq!(body["data"][0]["action_ref"], "f.long");
    assert_eq!(body["data"][0]["flags"], json!(["queue_long", "wait_long"]));
    p.health.check().await;
    let body = ok(&p.app, "/api/v1/actions").await;
    assert_eq!(
        health_of(&body),
        vec![
            ("f.calm".to_owned(), json!(["stuck"])),
            (
                "f.long".to_owned(),
                json!(["stuck", "queue_long", "wait_long"])
            ),
            ("f.stuck".to_owned(), json!(["stuck"])),
        ]
    );
    assert_eq!(body["data"][1]["health"], "stuck");
    // Past the critical age and without progress for 100 s: unhealthy flags come first.
    tokio::time::advance(Duration::from_secs(90)).await;
    let body = ok(&p.app, "/api/v1/actions?refs=f.long").await;
    assert_eq!(
        body["data"][0]["flags"],
        json!(["stalled", "wait_critical", "stuck", "queue_long"])
    );
    assert_eq!(body["data"][0]["health"], "stalled");
    p.exec.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------------------------
// One action

#[tokio::test(start_paused = true)]
async fn the_detail_shows_the_head_of_the_queue_what_runs_and_the_last_ends() {
    let p = page(
        2,
        HealthThresholds {
            stuck_age_seconds: 30,
            ..HealthThresholds::default()
        },
    )
    .await;
    let a = action("detail.a");
    submit(&p.exec, &a, 1..=5);
    settled(&p.exec, &a).await;
    tokio::time::advance(Duration::from_secs(10)).await;

    let body = ok(&p.app, "/api/v1/actions/detail.a?waiting=2").await;
    let d = &body["data"];
    assert_eq!(d["stats"]["action_ref"], "detail.a");
    assert_eq!(d["stats"]["queue_length"], 3);
    assert_eq!(d["policy"]["concurrency_limit"], 2);
    assert_eq!((&d["health"], &d["flags"]), (&json!("ok"), &json!([])));
    assert_eq!(d["waiting_total"], 3);
    let waiting = d["waiting"].as_array().expect("waiting");
    assert_eq!(waiting.len(), 2);
    assert_eq!(
        (&waiting[0]["position"], &waiting[0]["execution_id"]),
        (&json!(1), &json!(3))
    );
    assert_eq!(
        (&waiting[1]["position"], &waiting[1]["execution_id"]),
        (&json!(2), &json!(4))
    );
    assert!(close(&waiting[0]["wait_seconds"], 10.0), "{waiting:?}");
    assert!(waiting[0]["enqueued_at"].is_string());
    assert_eq!(d["running_total"], 2);
    let running: Vec<&Value> = d["running"]
        .as_array()
        .expect("running")
        .iter()
        .map(|r| &r["execution_id"])
        .collect();
    assert_eq!(running, vec![&json!(1), &json!(2)]);
    assert!(close(&d["running"][0]["running_seconds"], 10.0));
    assert_eq!(d["recent_ends"], json!([]));
    assert!(d.get("note").is_none());

    // 1 succeeds (3 starts), 5 is canceled while it waits; then the action is paused and a
    // new request for it is rejected.
    complete(&p.exec, 1, EndStatus::Succeeded);
    p.exec.cancel(vec![CancelRequest {
        execution_id: 5,
        receipt: None,
    }]);
    settled(&p.exec, &a).await;
    tokio::time::advance(Duration::from_secs(25)).await;
    p.exec
        .set_policy(
            &a,
            ActionPolicy {
                enabled: false,
                ..policy(2)
            },
        )
        .expect("policy set");
    submit(&p.exec, &a, [6]);
    settled(&p.exec, &a).await;

    let body = ok(&p.app, "/api/v1/actions/detail.a").await;
    let d = &body["data"];
    let ends: Vec<(u64, &str, &str)> = d["recent_ends"]
        .as_array()
        .expect("ends")
        .iter()
        .map(|e| {
            (
                e["execution_id"].as_u64().unwrap_or(0),
                e["outcome"].as_str().unwrap_or(""),
                e["stage"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        ends,
        vec![
            (6, "rejected", "requested"),
            (5, "canceled", "queued"),
            (1, "succeeded", "running")
        ]
    );
    assert_eq!(d["recent_ends"][0]["error_class"], "ActionDisabled");
    assert!(d["recent_ends"][1].get("error_class").is_none());
    // 2 has run 35 s (past stuck_age_seconds), 3 for 25 s.
    assert_eq!(d["running_total"], 2);
    assert_eq!(d["running"][0]["execution_id"], 2);
    assert_eq!(d["running"][1]["execution_id"], 3);
    assert_eq!(d["flags"], json!(["stuck", "disabled"]));
    assert_eq!(d["health"], "stuck");
    assert_eq!(d["policy"]["enabled"], false);
    assert_eq!(d["waiting_total"], 1);
    assert_eq!(d["waiting"][0]["execution_id"], 4);
    p.exec.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn only_the_last_twenty_ends_are_kept_most_recent_first() {
    let p = page(1, HealthThresholds::default()).await;
    let a = action("ends.a");
    for id in 1..=25 {
        submit(&p.exec, &a, [id]);
        complete(&p.exec, id, EndStatus::Failed);
    }
    settled(&p.exec, &a).await;
    let body = ok(&p.app, "/api/v1/actions/ends.a?waiting=0").await;
    let ids: Vec<u64> = body["data"]["recent_ends"]
        .as_array()
        .expect("ends")
        .iter()
        .filter_map(|e| e["execution_id"].as_u64())
        .collect();
    assert_eq!(ids, (6..=25).rev().collect::<Vec<_>>());
    assert!(
        body["data"]["recent_ends"]
            .as_array()
            .expect("ends")
            .iter()
            .all(|e| e["outcome"] == "failed")
    );
    p.exec.shutdown(Duration::from_secs(5)).await;
}
