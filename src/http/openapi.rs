//! `GET /api/v1/openapi.json`: the API described by hand as OpenAPI 3.0. A test checks that it
//! lists exactly the routes of [`super::ROUTES`], with the admin ones marked as needing the
//! bearer token.

use serde_json::{Value, json};

use super::paths;

pub async fn serve() -> axum::Json<Value> {
    axum::Json(document())
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": schema}}
    })
}

fn data(schema: Value) -> Value {
    json!({"type": "object", "required": ["data"], "properties": {"data": schema}})
}

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn admin_errors(mut responses: Value) -> Value {
    responses["401"] = error_response(
        "Missing or wrong bearer token, or no api.admin_token configured (every admin \
         endpoint then refuses)",
    );
    responses
}

/// The responses of the DLQ's POST endpoints: `success` and every refusal.
fn dlq_post_responses(success: Value) -> Value {
    admin_errors(json!({
        "200": success,
        "400": error_response("Bad body (`field` names the culprit)"),
        "413": error_response("Body larger than api.max_body_bytes"),
        "415": error_response("Body not sent as application/json"),
        "503": error_response("dlq.enabled is false, or RabbitMQ cannot be reached")
    }))
}

fn action_ref_param() -> Value {
    json!({
        "name": "ref", "in": "path", "required": true,
        "description": "Action ref: 1-255 characters of [A-Za-z0-9_.-]",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,255}$"}
    })
}

/// The document.
pub fn document() -> Value {
    let admin = json!([{"bearer": []}]);
    let mut doc_paths = serde_json::Map::new();
    doc_paths.insert(
        paths::HEALTH.to_owned(),
        json!({"get": {
            "summary": "Latest health check",
            "description": "Always 200 while the process answers; the verdict is `status`. The service runs its first check before HTTP answers; with health.enabled false `last_check` is null and `checks` empty. Says nothing of whether the service consumes yet: see /ready.",
            "responses": {"200": ok("Health report", schema("Health"))}
        }}),
    );
    doc_paths.insert(
        paths::READY.to_owned(),
        json!({"get": {
            "summary": "Whether the service takes work",
            "description": "200 once the RabbitMQ topology is declared, the consumers run and recovery from the ledger is done: a message published now reaches a queue the executor consumes. 503 before that, while the broker session is lost and being set up again (or, in cluster.mode shared, while the instance starts over in-process), and while shutting down; the error names the reason. Wait for this, not for /health, before publishing. Under systemd (Type=notify) the same moment sends READY=1.",
            "responses": {
                "200": ok("Ready", json!({
                    "type": "object", "required": ["status", "since"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ready"]},
                        "since": {"type": "string", "format": "date-time"}
                    }
                })),
                "503": error_response("Not ready; `error` says why and since when")
            }
        }}),
    );
    doc_paths.insert(
        paths::METRICS.to_owned(),
        json!({"get": {
            "summary": "Prometheus metrics (text exposition format 0.0.4)",
            "description": "Everything not per action, with totals over all actions (attune_executions_by_outcome_total, attune_queue_wait_seconds, attune_actions_known, attune_actions_exported), and the per-action series (attune_queue_*{action}, attune_executions_total{action,outcome}) of the actions where something waits or runs or that changed within executor.queue.metrics_idle_after_seconds. Any other action's series: /metrics/actions.",
            "responses": {
                "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "404": error_response("executor.queue.enable_metrics is false")
            }
        }}),
    );
    doc_paths.insert(
        paths::METRICS_ACTIONS.to_owned(),
        json!({"get": {
            "summary": "Per-action metrics of the named actions, busy or not (Prometheus text format 0.0.4)",
            "description": "The per-action families of /metrics (attune_queue_length, attune_queue_active_count, attune_queue_max_concurrent, attune_queue_oldest_age_seconds, attune_queue_last_updated, attune_executions_total) for each named action, whether or not /metrics shows it now; an action never seen has no series. For a targeted scrape or a look at a quiet action.",
            "parameters": [
                {"name": "action", "in": "query", "required": true, "description": "Comma-separated action refs (1 to 1000)", "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "400": error_response("`action` is missing or names no valid action ref, or too many; `field` is `action`"),
                "404": error_response("executor.queue.enable_metrics is false")
            }
        }}),
    );
    doc_paths.insert(
        paths::OPENAPI.to_owned(),
        json!({"get": {
            "summary": "This document",
            "responses": {"200": ok("OpenAPI 3.0 document", json!({"type": "object"}))}
        }}),
    );
    doc_paths.insert(
        paths::OVERVIEW.to_owned(),
        json!({"get": {
            "summary": "The operations page's overview: instance, health, totals, the last 15 minutes",
            "description": "Served from what is already kept: the latest health report, and a sample taken every 5 s (the last 180 kept). Totals are the latest sample's. Rates are admissions (dispatched) and worker completions between two samples per second; queue wait is over the executions admitted in that interval (null when none was). A request asks no actor and reads neither RabbitMQ nor Postgres.",
            "responses": {"200": ok("Overview", data(json!({
                "type": "object", "required": ["instance", "mode", "now", "health", "totals", "history"],
                "properties": {
                    "instance": {"type": "string", "description": "cluster.instance_id of the instance that answered"},
                    "mode": {"type": "string", "enum": ["single", "shared"]},
                    "now": {"type": "string", "format": "date-time"},
                    "health": {"allOf": [schema("Health")], "nullable": true, "description": "As /health serves it; null before the first check"},
                    "totals": {"type": "object", "properties": {
                        "actions": {"type": "integer"},
                        "queued": {"type": "integer"},
                        "running": {"type": "integer"},
                        "dispatched_per_second": {"type": "number"},
                        "completed_per_second": {"type": "number"},
                        "dlq_size": {"type": "integer", "nullable": true, "description": "null when dlq.enabled is false or the size could not be read"},
                        "sampled_at": {"type": "string", "format": "date-time"}
                    }},
                    "history": {"type": "array", "description": "Oldest first", "items": {
                        "type": "object",
                        "properties": {
                            "at": {"type": "string", "format": "date-time"},
                            "dispatched_per_second": {"type": "number"},
                            "completed_per_second": {"type": "number"},
                            "queued": {"type": "integer"},
                            "running": {"type": "integer"},
                            "queue_wait_mean_seconds": {"type": "number", "nullable": true},
                            "queue_wait_max_seconds": {"type": "number", "nullable": true}
                        }
                    }}
                }
            })))}
        }}),
    );
    doc_paths.insert(
        paths::ACTIONS.to_owned(),
        json!({"get": {
            "summary": "The actions table: filtered, sorted and paged, or the rows of named actions",
            "description": "Served from the latest counters each action reported and the policies in force; no actor is asked. With `refs` (which excludes the other parameters) it answers the named actions' rows in the order named, leaving out unknown ones, so a refresh costs in proportion to the rows shown. In cluster.mode shared, actions of partitions another instance owns are listed from queue_stats, with `partition` and `owner`. `health` is `ok` or the worst of `flags`: stalled, queue_critical, wait_critical (unhealthy); stuck (from the last health check), queue_long, wait_long, no_route (degraded); disabled (paused); each by health.thresholds as the health check judges the whole executor.",
            "parameters": [
                {"name": "q", "in": "query", "description": "Case-insensitive substring of the action ref", "schema": {"type": "string"}},
                {"name": "sort", "in": "query", "schema": {"type": "string", "enum": ["action_ref", "queue_length", "active_count", "max_concurrent", "oldest", "rate_limit", "enabled", "health"], "default": "action_ref"}},
                {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"], "default": "asc"}},
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
                {"name": "refs", "in": "query", "description": "Comma-separated action refs (1 to 500)", "schema": {"type": "string"}}
            ],
            "responses": {
                "200": ok("One page of rows", json!({
                    "type": "object", "required": ["data", "total", "offset", "limit"],
                    "properties": {
                        "data": {"type": "array", "items": schema("ActionRow")},
                        "total": {"type": "integer", "description": "Actions matching q (with refs: rows found)"},
                        "offset": {"type": "integer"},
                        "limit": {"type": "integer"}
                    }
                })),
                "400": error_response("A query parameter is invalid (`field` names it)"),
                "503": error_response("Shared mode: queue_stats or the partition table could not be read")
            }
        }}),
    );
    doc_paths.insert(
        paths::ACTION.to_owned(),
        json!({"get": {
            "summary": "One action in detail: counters, policy, health, the head of its queue, what runs, its last ends",
            "description": "Asks the action's actor. recent_ends keeps the last 20 ends; outcome is the worker's status (succeeded, failed, canceled, timeout) or why the executor ended it: canceled (while waiting), timed_out (queue timeout), purged, no_route, reclaimed, rejected (with error_class); stage says where it was (running, queued, requested). In shared mode, an action another instance owns is answered from queue_stats with empty lists and a `note`; so is an action whose actor did not answer.",
            "parameters": [
                action_ref_param(),
                {"name": "waiting", "in": "query", "description": "Waiting executions to list from the head", "schema": {"type": "integer", "minimum": 0, "maximum": 500, "default": 20}}
            ],
            "responses": {
                "200": ok("The action", data(json!({
                    "type": "object",
                    "required": ["stats", "policy", "health", "flags", "waiting", "waiting_total", "running", "running_total", "recent_ends"],
                    "properties": {
                        "stats": schema("QueueStats"),
                        "policy": schema("Policy"),
                        "health": {"type": "string"},
                        "flags": {"type": "array", "items": {"type": "string"}},
                        "waiting": {"type": "array", "items": {"type": "object", "properties": {
                            "position": {"type": "integer", "description": "1 for the head"},
                            "execution_id": {"type": "integer"},
                            "enqueued_at": {"type": "string", "format": "date-time"},
                            "wait_seconds": {"type": "number"}
                        }}},
                        "waiting_total": {"type": "integer"},
                        "running": {"type": "array", "description": "The longest-running first, at most 500", "items": {"type": "object", "properties": {
                            "execution_id": {"type": "integer"},
                            "started_at": {"type": "string", "format": "date-time"},
                            "running_seconds": {"type": "number"}
                        }}},
                        "running_total": {"type": "integer"},
                        "recent_ends": {"type": "array", "description": "Most recent first", "items": {"type": "object", "properties": {
                            "execution_id": {"type": "integer"},
                            "outcome": {"type": "string", "enum": ["succeeded", "failed", "canceled", "timeout", "timed_out", "purged", "no_route", "reclaimed", "rejected"]},
                            "stage": {"type": "string", "enum": ["running", "queued", "requested"]},
                            "error_class": {"type": "string"},
                            "ended_at": {"type": "string", "format": "date-time"}
                        }}},
                        "note": {"type": "string"}
                    }
                }))),
                "400": error_response("Bad ref or waiting"),
                "404": error_response("This executor has never seen the action"),
                "503": error_response("The action's actor did not answer and nothing it reported is kept, or queue_stats could not be read")
            }
        }}),
    );
    doc_paths.insert(
        paths::QUEUE_STATS.to_owned(),
        json!({"get": {
            "summary": "One action's queue statistics",
            "parameters": [action_ref_param()],
            "responses": {
                "200": ok("Counters now", data(schema("QueueStats"))),
                "400": error_response("The ref breaks the action-ref rule"),
                "404": error_response("This executor has never seen the action"),
                "503": error_response("The action's actor did not answer")
            }
        }}),
    );
    doc_paths.insert(
        paths::QUEUES.to_owned(),
        json!({"get": {
            "summary": "Every action's queue statistics, sorted",
            "parameters": [
                {"name": "sort", "in": "query", "schema": {"type": "string", "enum": ["queue_length", "active_count", "oldest"], "default": "queue_length"}},
                {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["desc", "asc"], "default": "desc"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100}}
            ],
            "responses": {
                "200": ok("Counters", json!({
                    "type": "object", "required": ["data", "total"],
                    "properties": {
                        "data": {"type": "array", "items": schema("QueueStats")},
                        "total": {"type": "integer", "description": "Actions known, before limit"}
                    }
                })),
                "400": error_response("A query parameter is invalid (`field` names it)")
            }
        }}),
    );
    doc_paths.insert(
        paths::CLUSTER.to_owned(),
        json!({"get": {
            "summary": "Every partition with its owner, epoch and what it holds",
            "description": "Actions are split into cluster.partitions partitions by FNV-1a 64 of the action ref's UTF-8 bytes, modulo the count. The epoch rises at every takeover; it is null without the ledger. actions, queued and running: from the answering instance's memory for the partitions it owns, from queue_stats (as their owners last wrote it) for the others.",
            "responses": {
                "200": ok("Partitions in order", data(json!({
                    "type": "object", "required": ["instance_id", "partition_count", "partitions"],
                    "properties": {
                        "instance_id": {"type": "string", "description": "The instance that answered"},
                        "partition_count": {"type": "integer"},
                        "partitions": {"type": "array", "items": {
                            "type": "object",
                            "required": ["partition", "owner", "epoch", "since", "actions", "queued", "running"],
                            "properties": {
                                "partition": {"type": "integer"},
                                "owner": {"type": "string"},
                                "epoch": {"type": "integer", "nullable": true},
                                "since": {"type": "string", "format": "date-time"},
                                "actions": {"type": "integer"},
                                "queued": {"type": "integer"},
                                "running": {"type": "integer"}
                            }
                        }}
                    }
                }))),
                "503": error_response("The partition table could not be read")
            }
        }}),
    );
    doc_paths.insert(
        paths::POLICY.to_owned(),
        json!({
            "get": {
                "summary": "The policy in force for an action (or that it would get)",
                "parameters": [action_ref_param()],
                "responses": {
                    "200": ok("Policy", data(schema("Policy"))),
                    "400": error_response("The ref breaks the action-ref rule")
                }
            },
            "put": {
                "summary": "Change any of an action's policy fields; takes effect at once",
                "description": "The body gives one or more of concurrency_limit, rate_limit and enabled; a field left out keeps what is in force for the action, and \"rate_limit\": null removes the rate limit. The merged policy is stored first (with durability: ledger in the action table, merged with the row as it is, so it survives a restart and the table's poller agrees with it; in memory mode until restart), then applied; if storing fails nothing changes. A higher limit admits from the head of the queue at once; a lower one preempts nothing. The answer is the whole policy now in force.",
                "security": admin,
                "parameters": [action_ref_param()],
                "requestBody": {"required": true, "content": {"application/json": {"schema": schema("PolicyInput")}}},
                "responses": admin_errors(json!({
                    "200": ok("The policy now in force", data(schema("Policy"))),
                    "400": error_response("Bad ref or body (`field` names the culprit), or a body that changes nothing ({})"),
                    "413": error_response("Body larger than api.max_body_bytes"),
                    "415": error_response("Body not sent as application/json"),
                    "503": error_response("The store failed (nothing changed) or the executor is stopping")
                }))
            }
        }),
    );
    doc_paths.insert(
        paths::CANCEL.to_owned(),
        json!({"post": {
            "summary": "Cancel a waiting execution",
            "security": admin,
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 1, "maximum": 9223372036854775807_u64}}],
            "responses": admin_errors(json!({
                "200": ok("Removed from its queue and recorded as canceled", data(json!({
                    "type": "object",
                    "properties": {"execution_id": {"type": "integer"}, "status": {"type": "string", "enum": ["canceled"]}}
                }))),
                "400": error_response("Not an execution id"),
                "404": error_response("No queued or running execution has this id"),
                "409": error_response("The execution is running; it is left to its worker"),
                "503": error_response("The executor did not answer in time")
            }))
        }}),
    );
    doc_paths.insert(
        paths::DLQ.to_owned(),
        json!({"get": {
            "summary": "Peek at the dead-letter queue without consuming it",
            "description": "Reads with basic.get and hands every message back with one nack (requeue): order and TTL are kept; read messages come back flagged redelivered. With queue_from or error_class (exact; `(none)` matches entries without the field), the first 1000 entries are read and the first `limit` that match are returned.",
            "security": admin,
            "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}},
                {"name": "queue_from", "in": "query", "schema": {"type": "string"}},
                {"name": "error_class", "in": "query", "schema": {"type": "string"}}
            ],
            "responses": admin_errors(json!({
                "200": ok("Entries from the head", data(json!({
                    "type": "object",
                    "properties": {
                        "queue_size": {"type": "integer"},
                        "entries": {"type": "array", "items": schema("DeadLetter")},
                        "matched": {"type": "integer", "description": "Entries read that match the filter (all read without one)"},
                        "scanned": {"type": "integer", "description": "Entries read"}
                    }
                }))),
                "400": error_response("Bad limit"),
                "503": error_response("dlq.enabled is false, or RabbitMQ cannot be reached")
            }))
        }}),
    );
    doc_paths.insert(
        paths::DLQ_STATS.to_owned(),
        json!({"get": {
            "summary": "Dead letters by origin and error class",
            "description": "Counts over the first 1000 entries (`sampled`); `queue_size` is the whole queue.",
            "security": admin,
            "responses": admin_errors(json!({
                "200": ok("Counts", data(json!({
                    "type": "object",
                    "properties": {
                        "queue_size": {"type": "integer"},
                        "sampled": {"type": "integer"},
                        "by_queue_from": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "by_error_class": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "oldest_failed_at": {"type": "string", "nullable": true},
                        "newest_failed_at": {"type": "string", "nullable": true}
                    }
                }))),
                "503": error_response("dlq.enabled is false, or RabbitMQ cannot be reached")
            }))
        }}),
    );
    doc_paths.insert(
        paths::DLQ_REPLAY.to_owned(),
        json!({"post": {
            "summary": "Replay dead letters as new execution requests",
            "description": "Publishes each chosen entry's `original` as `execution.requested` with x-retry-count = retry_count + 1, waits for the broker's confirm, then acknowledges the entry off the DLQ. Entries from `queued` get a new execution id (header x-replay-of names the old one); `running`, `completed` and invalid originals are skipped and stay.",
            "security": admin,
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema("DlqSelection")}}},
            "responses": dlq_post_responses(ok("What was replayed and skipped", data(json!({
                "type": "object",
                "properties": {
                    "replayed": {"type": "array", "items": {"type": "object", "properties": {
                        "execution_id": {"type": "integer", "nullable": true},
                        "replay_of": {"type": "integer", "nullable": true},
                        "action_ref": {"type": "string", "nullable": true},
                        "queue_from": {"type": "string"},
                        "error_class": {"type": "string"},
                        "retry_count": {"type": "integer"}
                    }}},
                    "skipped": {"type": "array", "items": {"type": "object", "properties": {
                        "execution_id": {"type": "integer", "nullable": true},
                        "reason": {"type": "string"}
                    }}},
                    "not_found": {"type": "array", "items": {"type": "integer"}},
                    "scanned": {"type": "integer"}
                }
            }))))
        }}),
    );
    doc_paths.insert(
        paths::DLQ_DISCARD.to_owned(),
        json!({"post": {
            "summary": "Discard dead letters: acknowledge them off the DLQ without replaying",
            "description": "Each discarded entry is logged at info level (execution id, action, queue_from, error_class) before it is acknowledged; it is gone afterwards. Entries not chosen stay in place and in order.",
            "security": admin,
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema("DlqSelection")}}},
            "responses": dlq_post_responses(ok("What was discarded", data(json!({
                "type": "object",
                "properties": {
                    "discarded": {"type": "array", "items": {"type": "object", "properties": {
                        "execution_id": {"type": "integer", "nullable": true},
                        "action_ref": {"type": "string", "nullable": true},
                        "queue_from": {"type": "string", "nullable": true},
                        "error_class": {"type": "string", "nullable": true}
                    }}},
                    "not_found": {"type": "array", "items": {"type": "integer"}},
                    "scanned": {"type": "integer"}
                }
            }))))
        }}),
    );
    doc_paths.insert(
        paths::PURGE.to_owned(),
        json!({"post": {
            "summary": "Run one purge cycle now",
            "security": admin,
            "parameters": [{"name": "dry_run", "in": "query", "description": "Default: purge.dry_run", "schema": {"type": "boolean"}}],
            "responses": admin_errors(json!({
                "200": ok("What the cycle purged (or would purge)", data(schema("PurgeReport"))),
                "400": error_response("Bad dry_run"),
                "409": error_response("A purge cycle is already running")
            }))
        }}),
    );

    doc_paths.insert(
        paths::CONFIG_STATUS.to_owned(),
        json!({"get": {
            "summary": "Where the configuration comes from, when it was loaded, and the last reload",
            "description": "No token: it holds no value of the configuration (no URL, no token), only the config file's path, times and changed key names.",
            "responses": {"200": ok("Status", data(schema("ConfigStatus")))}
        }}),
    );
    doc_paths.insert(
        paths::ADMIN_RELOAD.to_owned(),
        json!({"post": {
            "summary": "Reload the configuration (as SIGHUP does)",
            "description": "Reads the config file and the ATTUNE__ environment again (the process's own environment, which cannot change while it runs) and validates them as start-up does. What can change while running is applied at once (`applied`); other changed keys keep their old values until a restart (`needs_restart`). An invalid configuration changes nothing and is answered 400 with the message start-up would print. Reloads are serialised: this waits for one in progress.",
            "security": admin,
            "responses": admin_errors(json!({
                "200": ok("Loaded: `applied` or `unchanged`", data(schema("ReloadReport"))),
                "400": error_response("The configuration is invalid (the message start-up would print); nothing changed"),
                "409": error_response("The service was given a configuration built in code: nothing to read again")
            }))
        }}),
    );

    // Built in two steps: one `json!` holding every schema exceeds the macro's recursion limit.
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "fifo-executor",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Operations API of the per-action FIFO executor. Errors are JSON: {\"error\": message, \"code\": CODE, \"field\": culprit (when one)}."
        },
        "paths": doc_paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "api.admin_token"}},
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error", "code"],
                    "properties": {
                        "error": {"type": "string"},
                        "code": {"type": "string", "enum": ["BAD_REQUEST", "UNAUTHORIZED", "NOT_FOUND", "METHOD_NOT_ALLOWED", "CONFLICT", "PAYLOAD_TOO_LARGE", "UNSUPPORTED_MEDIA_TYPE", "SERVICE_UNAVAILABLE", "INTERNAL_ERROR"]},
                        "field": {"type": "string"}
                    }
                },
                "QueueStats": {
                    "type": "object",
                    "required": ["action_ref", "queue_length", "active_count", "max_concurrent", "oldest_enqueued_at", "total_enqueued", "total_completed", "last_updated"],
                    "properties": {
                        "action_ref": {"type": "string"},
                        "queue_length": {"type": "integer", "description": "Executions waiting"},
                        "active_count": {"type": "integer", "description": "Executions holding a slot"},
                        "max_concurrent": {"type": "integer"},
                        "oldest_enqueued_at": {"type": "string", "format": "date-time", "nullable": true},
                        "total_enqueued": {"type": "integer"},
                        "total_completed": {"type": "integer"},
                        "last_updated": {"type": "string", "format": "date-time", "description": "When anything about the queue last changed"},
                        "oldest_age_seconds": {"type": "number"},
                        "last_progress": {"type": "string", "format": "date-time", "description": "Last admission, completion or removal"},
                        "enabled": {"type": "boolean"},
                        "total_canceled": {"type": "integer"},
                        "total_timed_out": {"type": "integer"},
                        "total_purged": {"type": "integer"},
                        "total_reclaimed": {"type": "integer"},
                        "total_rejected": {"type": "integer"},
                        "total_unmatched": {"type": "integer"},
                        "partition": {"type": "integer", "description": "cluster.mode shared only: the action's partition"},
                        "owner": {"type": "string", "description": "cluster.mode shared only: the instance that owns the partition. An instance that does not own it answers from queue_stats, as the owner last wrote it (the counters beyond the table's columns are then 0)"}
                    }
                },
                "RateLimit": {
                    "type": "object", "required": ["max", "per_seconds"], "additionalProperties": false,
                    "properties": {
                        "max": {"type": "integer", "minimum": 1, "maximum": 2147483647},
                        "per_seconds": {"type": "integer", "minimum": 1, "maximum": 31536000}
                    }
                },
                "PolicyInput": {
                    "type": "object", "minProperties": 1, "additionalProperties": false,
                    "description": "Any of the fields, at least one; those left out keep what is in force",
                    "properties": {
                        "concurrency_limit": {"type": "integer", "minimum": 1, "maximum": 2147483647},
                        "rate_limit": {"allOf": [{"$ref": "#/components/schemas/RateLimit"}], "nullable": true, "description": "null removes the rate limit; left out, it is kept"},
                        "enabled": {"type": "boolean"}
                    }
                },
                "Policy": {
                    "type": "object",
                    "properties": {
                        "action_ref": {"type": "string"},
                        "concurrency_limit": {"type": "integer"},
                        "rate_limit": {"allOf": [{"$ref": "#/components/schemas/RateLimit"}], "nullable": true},
                        "enabled": {"type": "boolean"}
                    }
                },
                "DeadLetter": {
                    "type": "object",
                    "description": "As published on attune.dlx; a message that is not a JSON object shows as {\"unreadable\": true, \"raw\": …}",
                    "properties": {
                        "execution_id": {"type": "integer", "nullable": true},
                        "action_ref": {"type": "string", "nullable": true},
                        "queue_from": {"type": "string", "enum": ["requested", "queued", "running", "completed", "cancel"]},
                        "error_class": {"type": "string"},
                        "error_message": {"type": "string"},
                        "failed_at": {"type": "string", "format": "date-time"},
                        "retry_count": {"type": "integer"},
                        "request_id": {"type": "string", "nullable": true},
                        "original": {}
                    }
                },
                "Health": {
                    "type": "object", "required": ["status", "last_check", "checks"],
                    "properties": {
                        "status": {"type": "string", "enum": ["healthy", "degraded", "unhealthy"]},
                        "last_check": {"type": "string", "format": "date-time", "nullable": true},
                        "emergency_mode": {"type": "boolean"},
                        "checks": {"type": "object", "additionalProperties": {
                            "type": "object",
                            "properties": {
                                "status": {"type": "string", "enum": ["healthy", "degraded", "unhealthy"]},
                                "value": {"type": "number", "nullable": true},
                                "warning": {"type": "integer"},
                                "critical": {"type": "integer"},
                                "detail": {"type": "string"}
                            }
                        }},
                        "totals": {"type": "object"}
                    }
                },
                "ReloadReport": {
                    "type": "object",
                    "required": ["result", "trigger", "attempted_at", "loaded_at", "applied", "needs_restart", "notes", "error"],
                    "properties": {
                        "result": {"type": "string", "enum": ["applied", "unchanged", "invalid"], "description": "applied: at least one key is in force now; unchanged: nothing that can change while running changed; invalid: refused, nothing changed"},
                        "trigger": {"type": "string", "enum": ["signal", "api"]},
                        "attempted_at": {"type": "string", "format": "date-time"},
                        "loaded_at": {"type": "string", "format": "date-time", "description": "When the configuration in force was read: attempted_at unless invalid"},
                        "applied": {"type": "array", "items": {"type": "string"}, "description": "Dotted keys now in force, e.g. policies.actions.\"core.http.get\".concurrency_limit"},
                        "needs_restart": {"type": "array", "items": {"type": "string"}, "description": "Dotted keys that changed but keep their old values until a restart"},
                        "notes": {"type": "array", "items": {"type": "string"}, "description": "E.g. logging.filter applied while RUST_LOG wins"},
                        "error": {"type": "string", "nullable": true, "description": "invalid: the message start-up would print"}
                    }
                },
                "ConfigStatus": {
                    "type": "object",
                    "required": ["path", "reloadable", "loaded_at", "last_reload"],
                    "properties": {
                        "path": {"type": "string", "nullable": true, "description": "The config file given to serve --config"},
                        "reloadable": {"type": "boolean", "description": "False for a configuration built in code"},
                        "loaded_at": {"type": "string", "format": "date-time", "description": "When the configuration in force was read (start, or the last reload that was not invalid)"},
                        "last_reload": {"allOf": [{"$ref": "#/components/schemas/ReloadReport"}], "nullable": true}
                    }
                },
                "PurgeReport": {
                    "type": "object",
                    "properties": {
                        "dry_run": {"type": "boolean"},
                        "trigger": {"type": "string", "enum": ["scheduled", "manual"]},
                        "started_at": {"type": "string", "format": "date-time"},
                        "duration_seconds": {"type": "number"},
                        "purged": {"type": "integer"},
                        "queued": {"type": "integer"},
                        "running": {"type": "integer"},
                        "emergency_mode": {"type": "boolean"},
                        "entries": {"type": "array", "items": {"type": "object", "properties": {
                            "action_ref": {"type": "string"},
                            "execution_id": {"type": "integer"},
                            "state": {"type": "string", "enum": ["queued", "running"]},
                            "age_seconds": {"type": "number"},
                            "limit_seconds": {"type": "number"}
                        }}},
                        "ledger": {
                            "type": "object", "nullable": true,
                            "description": "Ledger rows deleted (or, in a dry run, that would be); null without the Postgres ledger",
                            "properties": {
                                "completed_executions": {"type": "integer"},
                                "stale_stats": {"type": "integer"},
                                "old_snapshots": {"type": "integer"},
                                "old_health_checks": {"type": "integer"}
                            }
                        },
                        "ledger_error": {"type": "string"}
                    }
                }
            }
        }
    });
    let schemas = &mut doc["components"]["schemas"];
    schemas["ActionRow"] = json!({
        "type": "object",
        "required": ["action_ref", "queue_length", "active_count", "max_concurrent", "oldest_age_seconds", "oldest_enqueued_at", "rate_limit", "enabled", "health", "flags", "last_updated"],
        "properties": {
            "action_ref": {"type": "string"},
            "queue_length": {"type": "integer"},
            "active_count": {"type": "integer"},
            "max_concurrent": {"type": "integer"},
            "oldest_age_seconds": {"type": "number"},
            "oldest_enqueued_at": {"type": "string", "format": "date-time", "nullable": true},
            "rate_limit": {"allOf": [{"$ref": "#/components/schemas/RateLimit"}], "nullable": true},
            "enabled": {"type": "boolean"},
            "health": {"type": "string", "description": "ok, or the worst of flags"},
            "flags": {"type": "array", "items": {"type": "string", "enum": ["stalled", "queue_critical", "wait_critical", "stuck", "queue_long", "wait_long", "no_route", "disabled"]}},
            "last_updated": {"type": "string", "format": "date-time"},
            "partition": {"type": "integer", "description": "cluster.mode shared only"},
            "owner": {"type": "string", "description": "cluster.mode shared only"}
        }
    });
    schemas["DlqSelection"] = json!({
        "type": "object", "additionalProperties": false,
        "description": "Either execution_ids (the first entry of each id, anywhere in the queue), or limit (the first N entries from the head) with an optional filter (the first N entries that match, looked for among the first 100,000)",
        "properties": {
            "execution_ids": {"type": "array", "minItems": 1, "maxItems": 1000, "items": {"type": "integer", "minimum": 1}},
            "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
            "filter": {"type": "object", "additionalProperties": false, "description": "Exact match; a field left out matches every entry; `(none)` matches entries without the field", "properties": {
                "queue_from": {"type": "string"},
                "error_class": {"type": "string"}
            }}
        }
    });
    doc
}
