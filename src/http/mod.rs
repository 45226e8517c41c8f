//! The HTTP edge on `api.listen`: the operators' API, `/health`, `/ready`, `/metrics` and the
//! operations page ([`ui`], `GET /`), which reads and calls the same API.
//!
//! [`router`] builds the whole API from an [`AppState`] without binding anything, so tests
//! drive it with `oneshot`; [`serve`] runs it on a listener until a shutdown future resolves.
//! The service starts HTTP after its first health check and closes it last, after the core
//! has drained, so `/health` and `/metrics` answer for as long as anything is happening.
//!
//! | method | path | auth | |
//! | --- | --- | --- | --- |
//! | GET | `/health` | | latest health check |
//! | GET | `/ready` | | 200 once consuming, 503 with the reason before and while not |
//! | GET | `/metrics` | | Prometheus text |
//! | GET | `/metrics/actions?action=a,b` | | the named actions' per-action series, busy or not |
//! | GET | `/api/v1/openapi.json` | | this API, as OpenAPI 3 |
//! | GET | `/api/v1/overview` | | instance, health, totals, the last 15 minutes |
//! | GET | `/api/v1/actions` | | the actions table: filtered, sorted, paged; or `refs=` rows |
//! | GET | `/api/v1/actions/{ref}` | | one action: counters, policy, waiting, running, last ends |
//! | GET | `/api/v1/actions/{ref}/queue-stats` | | one action's counters |
//! | GET | `/api/v1/queues` | | every action's counters, sorted |
//! | GET | `/api/v1/cluster` | | the partitions, their owners and epochs |
//! | GET | `/api/v1/actions/{ref}/policy` | | policy in force |
//! | PUT | `/api/v1/actions/{ref}/policy` | admin | change any of a policy's fields |
//! | POST | `/api/v1/executions/{id}/cancel` | admin | cancel a waiting execution |
//! | GET | `/api/v1/dlq` | admin | peek at dead letters |
//! | GET | `/api/v1/dlq/stats` | admin | dead letters by origin and class |
//! | POST | `/api/v1/dlq/replay` | admin | replay dead letters |
//! | POST | `/api/v1/dlq/discard` | admin | discard dead letters |
//! | POST | `/api/v1/purge` | admin | run a purge cycle now |
//! | GET | `/api/v1/config/status` | | where the config comes from, when it was loaded, the last reload |
//! | POST | `/api/v1/admin/reload` | admin | reload the configuration |
//! | GET | `/`, `/ui/app.js`, `/ui/app.css` | | the operations page ([`ui`]) |

pub mod actions;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod dlq;
pub mod error;
pub mod executions;
pub mod extract;
pub mod openapi;
pub mod ops;
pub mod overview;
pub mod queues;
pub mod telemetry;
pub mod ui;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::middleware;
use axum::routing::{MethodRouter, get, post, put};

use crate::config::Secret;
use crate::core::Executor;
use crate::core::memory::LatestStats;
use crate::ops::dlq::Dlq;
use crate::ops::health::HealthMonitor;
use crate::ops::history::Sampler;
use crate::ops::hooks::PolicyStore;
use crate::ops::metrics::Metrics;
use crate::ops::purge::Purger;
use crate::ops::readiness::Readiness;
use crate::ops::reload::Reloader;
use error::ApiError;

/// The route paths, in axum's syntax (also OpenAPI's).
pub mod paths {
    pub const HEALTH: &str = "/health";
    pub const READY: &str = "/ready";
    pub const METRICS: &str = "/metrics";
    pub const METRICS_ACTIONS: &str = "/metrics/actions";
    pub const OPENAPI: &str = "/api/v1/openapi.json";
    pub const OVERVIEW: &str = "/api/v1/overview";
    pub const ACTIONS: &str = "/api/v1/actions";
    pub const ACTION: &str = "/api/v1/actions/{ref}";
    pub const QUEUE_STATS: &str = "/api/v1/actions/{ref}/queue-stats";
    pub const QUEUES: &str = "/api/v1/queues";
    pub const CLUSTER: &str = "/api/v1/cluster";
    pub const POLICY: &str = "/api/v1/actions/{ref}/policy";
    pub const CANCEL: &str = "/api/v1/executions/{id}/cancel";
    pub const DLQ: &str = "/api/v1/dlq";
    pub const DLQ_STATS: &str = "/api/v1/dlq/stats";
    pub const DLQ_REPLAY: &str = "/api/v1/dlq/replay";
    pub const DLQ_DISCARD: &str = "/api/v1/dlq/discard";
    pub const PURGE: &str = "/api/v1/purge";
    pub const CONFIG_STATUS: &str = "/api/v1/config/status";
    pub const ADMIN_RELOAD: &str = "/api/v1/admin/reload";
}

/// A route: method, path, and whether it needs the admin token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub admin: bool,
}

const fn route(method: &'static str, path: &'static str, admin: bool) -> Route {
    Route {
        method,
        path,
        admin,
    }
}

/// Every route [`router`] serves; the tests check it against the router and the OpenAPI
/// document, so none of the three can forget one.
pub const ROUTES: &[Route] = &[
    route("GET", paths::HEALTH, false),
    route("GET", paths::READY, false),
    route("GET", paths::METRICS, false),
    route("GET", paths::METRICS_ACTIONS, false),
    route("GET", paths::OPENAPI, false),
    route("GET", paths::OVERVIEW, false),
    route("GET", paths::ACTIONS, false),
    route("GET", paths::ACTION, false),
    route("GET", paths::QUEUE_STATS, false),
    route("GET", paths::QUEUES, false),
    route("GET", paths::CLUSTER, false),
    route("GET", paths::POLICY, false),
    route("PUT", paths::POLICY, true),
    route("POST", paths::CANCEL, true),
    route("GET", paths::DLQ, true),
    route("GET", paths::DLQ_STATS, true),
    route("POST", paths::DLQ_REPLAY, true),
    route("POST", paths::DLQ_DISCARD, true),
    route("POST", paths::PURGE, true),
    route("GET", paths::CONFIG_STATUS, false),
    route("POST", paths::ADMIN_RELOAD, true),
];

/// What the handlers reach.
#[derive(Clone)]
pub struct AppState {
    pub executor: Arc<Executor>,
    /// The latest counters each action reported; the fallback when its actor cannot answer,
    /// and the source of the queue gauges.
    pub stats: Arc<LatestStats>,
    pub health: Arc<HealthMonitor>,
    pub purger: Arc<Purger>,
    /// The DLQ reader; it answers only while `dlq.enabled` is true.
    pub dlq: Option<Arc<Dlq>>,
    /// `None` when `executor.queue.enable_metrics` is false.
    pub metrics: Option<Metrics>,
    pub policies: Arc<dyn PolicyStore>,
    /// `api.admin_token`; `None` disables the admin routes.
    pub admin_token: Option<Secret>,
    /// `api.max_body_bytes`.
    pub max_body_bytes: usize,
    /// Reloads the configuration and says when it was loaded.
    pub reloader: Arc<Reloader>,
    /// The partitions and their owners, for `GET /api/v1/cluster`.
    pub cluster: Arc<cluster::ClusterView>,
    /// Whether the service takes work, for `GET /ready`.
    pub readiness: Arc<Readiness>,
    /// The last 15 minutes of throughput and the totals, for `GET /api/v1/overview`.
    pub history: Arc<Sampler>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("admin_token", &self.admin_token)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let max_body_bytes = state.max_body_bytes;
    let state = Arc::new(state);
    let admin = |m: MethodRouter<Arc<AppState>>| {
        m.route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ))
    };
    Router::new()
        .route(paths::HEALTH, get(ops::health))
        .route(paths::READY, get(ops::ready))
        .route(paths::METRICS, get(ops::metrics))
        .route(paths::METRICS_ACTIONS, get(ops::metrics_actions))
        .route(paths::OPENAPI, get(openapi::serve))
        .route(paths::OVERVIEW, get(overview::overview))
        .route(paths::ACTIONS, get(actions::list))
        .route(paths::ACTION, get(actions::detail))
        .route(paths::QUEUE_STATS, get(queues::queue_stats))
        .route(paths::QUEUES, get(queues::list_queues))
        .route(paths::CLUSTER, get(cluster::cluster))
        .route(
            paths::POLICY,
            get(queues::get_policy).merge(admin(put(queues::put_policy))),
        )
        .route(paths::CANCEL, admin(post(executions::cancel)))
        .route(paths::DLQ, admin(get(dlq::list)))
        .route(paths::DLQ_STATS, admin(get(dlq::stats)))
        .route(paths::DLQ_REPLAY, admin(post(dlq::replay)))
        .route(paths::DLQ_DISCARD, admin(post(dlq::discard)))
        .route(paths::PURGE, admin(post(ops::purge)))
        .route(paths::CONFIG_STATUS, get(config::status))
        .route(paths::ADMIN_RELOAD, admin(post(config::reload)))
        .merge(ui::routes())
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn(telemetry::track))
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no endpoint {method} {}; see {}",
        uri.path(),
        paths::OPENAPI
    ))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Serves `app` on `listener` until `shutdown` resolves, then finishes the requests in
/// progress and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
