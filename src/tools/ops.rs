//! The operators' commands behind `fifo-executor stats | health | purge | dlq`: each calls the
//! running service's HTTP API (see [`crate::http`]) and prints a readable table, or the API's
//! JSON with `--json` for scripts.
//!
//! Rendering is kept apart from the calls ([`render`]) so tests can check the tables from
//! known JSON without a service.

use serde_json::Value;

use crate::http::client::{Client, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The service refused: its own message and code.
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the service answered something that is not JSON: {0}")]
    NotJson(String),
    #[error("{0}")]
    Usage(String),
}

/// Calls the API and returns the whole JSON answer of a 2xx, or the service's error.
pub async fn call(
    client: &Client,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, OpsError> {
    let bytes = body.map(|b| b.to_string().into_bytes());
    let response = client.request(method, path, bytes.as_deref()).await?;
    let json: Value = serde_json::from_slice(&response.body).map_err(|_| {
        OpsError::NotJson(
            String::from_utf8_lossy(&response.body)
                .chars()
                .take(200)
                .collect(),
        )
    })?;
    if (200..300).contains(&response.status) {
        Ok(json)
    } else {
        Err(OpsError::Api {
            status: response.status,
            code: json["code"].as_str().unwrap_or("?").to_owned(),
            message: json["error"].as_str().unwrap_or("no message").to_owned(),
        })
    }
}

/// `stats [ACTION]`
pub async fn stats(
    client: &Client,
    action: Option<&str>,
    sort: &str,
    limit: usize,
) -> Result<Value, OpsError> {
    match action {
        Some(a) => {
            crate::model::validate_action_ref(a).map_err(|e| OpsError::Usage(e.to_string()))?;
            call(
                client,
                "GET",
                &format!("/api/v1/actions/{a}/queue-stats"),
                None,
            )
            .await
        }
        None => {
            call(
                client,
                "GET",
                &format!("/api/v1/queues?sort={sort}&order=desc&limit={limit}"),
                None,
            )
            .await
        }
    }
}

/// `health`
pub async fn health(client: &Client) -> Result<Value, OpsError> {
    call(client, "GET", "/health", None).await
}

/// `purge [--dry-run | --live]`; `None` leaves the mode to the service's `purge.dry_run`.
pub async fn purge(client: &Client, dry_run: Option<bool>) -> Result<Value, OpsError> {
    let path = match dry_run {
        Some(d) => format!("/api/v1/purge?dry_run={d}"),
        None => "/api/v1/purge".to_owned(),
    };
    call(client, "POST", &path, None).await
}

/// `dlq list`
pub async fn dlq_list(client: &Client, limit: usize) -> Result<Value, OpsError> {
    call(client, "GET", &format!("/api/v1/dlq?limit={limit}"), None).await
}

/// `dlq stats`
pub async fn dlq_stats(client: &Client) -> Result<Value, OpsError> {
    call(client, "GET", "/api/v1/dlq/stats", None).await
}

/// `dlq replay --id … | --limit N`
pub async fn dlq_replay(
    client: &Client,
    ids: &[u64],
    limit: Option<usize>,
) -> Result<Value, OpsError> {
    let body = match (ids.is_empty(), limit) {
        (false, None) => serde_json::json!({ "execution_ids": ids }),
        (true, Some(n)) => serde_json::json!({ "limit": n }),
        _ => {
            return Err(OpsError::Usage(
                "give either --id (one or more) or --limit".to_owned(),
            ));
        }
    };
    call(client, "POST", "/api/v1/dlq/replay", Some(&body)).await
}

/// Tables from the API's JSON.
pub mod render {
    use serde_json::Value;

    fn text(v: &Value) -> String {
        match v {
            Value::Null => "-".to_owned(),
            Value::String(s) => s.clone(),
            Value::Number(n) => match n.as_f64() {
                Some(f) if n.is_f64() => format!("{f:.0}"),
                _ => n.to_string(),
            },
            other => other.to_string(),
        }
    }

    /// Seconds as `45s`, `12m05s`, `3h02m`.
    pub fn duration(seconds: f64) -> String {
        let s = seconds.max(0.0) as u64;
        match s {
            0..=59 => format!("{s}s"),
            60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
            _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        }
    }

    /// Columns padded to their widest cell; `right` marks the numeric ones.
    pub fn table(headers: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
        let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let line = |cells: Vec<String>| {
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let w = widths.get(i).copied().unwrap_or(0);
                    if right.get(i).copied().unwrap_or(false) {
                        format!("{c:>w$}")
                    } else {
                        format!("{c:<w$}")
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        };
        let mut out = vec![line(headers.iter().map(|h| (*h).to_owned()).collect())];
        out.extend(rows.iter().map(|r| line(r.clone())));
        out.join("\n")
    }

    fn short(s: &str, max: usize) -> String {
        if s.chars().count() <= max {
            s.to_owned()
        } else {
            let cut: String = s.chars().take(max.saturating_sub(1)).collect();
            format!("{cut}…")
        }
    }

    /// One action's counters, as `key  value` lines.
    pub fn queue(d: &Value) -> String {
        let keys = [
            "action_ref",
            "queue_length",
            "active_count",
            "max_concurrent",
            "oldest_enqueued_at",
            "oldest_age_seconds",
            "total_enqueued",
            "total_completed",
            "total_canceled",
            "total_timed_out",
            "total_purged",
            "total_reclaimed",
            "total_rejected",
            "total_unmatched",
            "enabled",
            "last_updated",
            "last_progress",
        ];
        let rows: Vec<Vec<String>> = keys
            .iter()
            .filter(|k| d.get(**k).is_some())
            .map(|k| {
                let v = if *k == "oldest_age_seconds" {
                    duration(d[*k].as_f64().unwrap_or(0.0))
                } else {
                    text(&d[*k])
                };
                vec![(*k).to_owned(), v]
            })
            .collect();
        table(&["FIELD", "VALUE"], &[false, false], &rows)
    }

    /// Every action's counters.
    pub fn queues(answer: &Value) -> String {
        let empty = Vec::new();
        let list = answer["data"].as_array().unwrap_or(&empty);
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|d| {
                vec![
                    text(&d["action_ref"]),
                    text(&d["queue_length"]),
                    text(&d["active_count"]),
                    text(&d["max_concurrent"]),
                    duration(d["oldest_age_seconds"].as_f64().unwrap_or(0.0)),
                    text(&d["total_enqueued"]),
                    text(&d["total_completed"]),
                    if d["enabled"] == Value::Bool(false) {
                        "disabled".to_owned()
                    } else {
                        String::new()
                    },
                ]
            })
            .collect();
        let mut out = table(
            &[
                "ACTION",
                "QUEUED",
                "ACTIVE",
                "MAX",
                "OLDEST",
                "ENQUEUED",
                "COMPLETED",
                "",
            ],
            &[false, true, true, true, true, true, true, false],
            &rows,
        );
        let total = answer["total"].as_u64().unwrap_or(list.len() as u64);
        if total > list.len() as u64 {
            out.push_str(&format!("\n({} of {total} actions)", list.len()));
        }
        out
    }

    /// The health report.
    pub fn health(h: &Value) -> String {
        let status = h["status"].as_str().unwrap_or("?").to_ascii_uppercase();
        let mut out = match h["last_check"].as_str() {
            Some(t) => format!("Status: {status} (checked {t})"),
            None => format!("Status: {status} (no check has run yet: the process is up)"),
        };
        if h["emergency_mode"] == Value::Bool(true) {
            out.push_str("\nEMERGENCY MODE is on");
        }
        if let Some(checks) = h["checks"].as_object().filter(|c| !c.is_empty()) {
            let rows: Vec<Vec<String>> = checks
                .iter()
                .map(|(name, c)| {
                    vec![
                        name.clone(),
                        c["status"].as_str().unwrap_or("?").to_owned(),
                        text(&c["value"]),
                        text(c.get("warning").unwrap_or(&Value::Null)),
                        text(c.get("critical").unwrap_or(&Value::Null)),
                        short(c["detail"].as_str().unwrap_or(""), 70),
                    ]
                })
                .collect();
            out.push('\n');
            out.push_str(&table(
                &["CHECK", "STATUS", "VALUE", "WARNING", "CRITICAL", "DETAIL"],
                &[false, false, true, true, true, false],
                &rows,
            ));
        }
        out
    }

    /// A purge report.
    pub fn purge(answer: &Value) -> String {
        let d = &answer["data"];
        let dry = d["dry_run"] == Value::Bool(true);
        let mut out = format!(
            "{}: {} entries {} ({} queued, {} running) in {:.2}s",
            if dry { "Dry run" } else { "Purge" },
            text(&d["purged"]),
            if dry { "would be purged" } else { "purged" },
            text(&d["queued"]),
            text(&d["running"]),
            d["duration_seconds"].as_f64().unwrap_or(0.0)
        );
        let ledger = &d["ledger"];
        if ledger.is_object() {
            out.push_str(&format!(
                "\nledger rows {}: {} finished executions, {} idle queue_stats, {} \
                 queue_snapshots, {} health_checks",
                if dry {
                    "that would be deleted"
                } else {
                    "deleted"
                },
                text(&ledger["completed_executions"]),
                text(&ledger["stale_stats"]),
                text(&ledger["old_snapshots"]),
                text(&ledger["old_health_checks"]),
            ));
        }
        if let Some(e) = d["ledger_error"].as_str() {
            out.push_str(&format!("\nledger purge failed: {e}"));
        }
        let empty = Vec::new();
        let entries = d["entries"].as_array().unwrap_or(&empty);
        if !entries.is_empty() {
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        text(&e["action_ref"]),
                        text(&e["execution_id"]),
                        text(&e["state"]),
                        duration(e["age_seconds"].as_f64().unwrap_or(0.0)),
                        duration(e["limit_seconds"].as_f64().unwrap_or(0.0)),
                    ]
                })
                .collect();
            out.push('\n');
            out.push_str(&table(
                &["ACTION", "EXECUTION", "STATE", "AGE", "MAX"],
                &[false, true, false, true, true],
                &rows,
            ));
        }
        out
    }

    /// Entries from the head of the DLQ.
    pub fn dlq_list(answer: &Value) -> String {
        let d = &answer["data"];
        let empty = Vec::new();
        let entries = d["entries"].as_array().unwrap_or(&empty);
        let rows: Vec<Vec<String>> = entries
            .iter()
            .map(|e| {
                if e["unreadable"] == Value::Bool(true) {
                    return vec![
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        "(unreadable)".into(),
                        "-".into(),
                        "-".into(),
                        short(&text(&e["raw"]), 60),
                    ];
                }
                vec![
                    text(&e["execution_id"]),
                    text(&e["action_ref"]),
                    text(&e["queue_from"]),
                    text(&e["error_class"]),
                    text(&e["failed_at"]),
                    text(&e["retry_count"]),
                    short(e["error_message"].as_str().unwrap_or(""), 60),
                ]
            })
            .collect();
        let mut out = table(
            &[
                "EXECUTION",
                "ACTION",
                "FROM",
                "ERROR_CLASS",
                "FAILED_AT",
                "RETRIES",
                "MESSAGE",
            ],
            &[true, false, false, false, false, true, false],
            &rows,
        );
        out.push_str(&format!(
            "\n({} shown, {} in attune.dlq; oldest first)",
            entries.len(),
            text(&d["queue_size"])
        ));
        out
    }

    /// Counts over the DLQ.
    pub fn dlq_stats(answer: &Value) -> String {
        let d = &answer["data"];
        let mut out = format!(
            "attune.dlq: {} messages (counts below over the first {})",
            text(&d["queue_size"]),
            text(&d["sampled"])
        );
        for (title, key) in [("FROM", "by_queue_from"), ("ERROR_CLASS", "by_error_class")] {
            let mut rows: Vec<(String, u64)> = d[key]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default();
            if rows.is_empty() {
                continue;
            }
            rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let rows: Vec<Vec<String>> = rows
                .into_iter()
                .map(|(k, n)| vec![k, n.to_string()])
                .collect();
            out.push_str("\n\n");
            out.push_str(&table(&[title, "COUNT"], &[false, true], &rows));
        }
        if let (Some(a), Some(b)) = (
            d["oldest_failed_at"].as_str(),
            d["newest_failed_at"].as_str(),
        ) {
            out.push_str(&format!("\n\nfailed between {a} and {b}"));
        }
        out
    }

    /// What a replay did.
    pub fn replay(answer: &Value) -> String {
        let d = &answer["data"];
        let empty = Vec::new();
        let replayed = d["replayed"].as_array().unwrap_or(&empty);
        let skipped = d["skipped"].as_array().unwrap_or(&empty);
        let not_found = d["not_found"].as_array().unwrap_or(&empty);
        let mut out = format!(
            "Replayed {}, skipped {}, not found {} (looked at {} entries)",
            replayed.len(),
            skipped.len(),
            not_found.len(),
            text(&d["scanned"])
        );
        if !replayed.is_empty() {
            let rows: Vec<Vec<String>> = replayed
                .iter()
                .map(|r| {
                    vec![
                        match (&r["execution_id"], &r["replay_of"]) {
                            (Value::Null, Value::Null) => "(new)".to_owned(),
                            (Value::Null, old) => format!("(new, was {})", text(old)),
                            (id, _) => text(id),
                        },
                        text(&r["action_ref"]),
                        text(&r["queue_from"]),
                        text(&r["error_class"]),
                        text(&r["retry_count"]),
                    ]
                })
                .collect();
            out.push_str("\n\n");
            out.push_str(&table(
                &["EXECUTION", "ACTION", "FROM", "ERROR_CLASS", "RETRY"],
                &[false, false, false, false, true],
                &rows,
            ));
        }
        if !skipped.is_empty() {
            let rows: Vec<Vec<String>> = skipped
                .iter()
                .map(|s| vec![text(&s["execution_id"]), text(&s["reason"])])
                .collect();
            out.push_str("\n\nskipped (left in the DLQ):\n");
            out.push_str(&table(&["EXECUTION", "REASON"], &[true, false], &rows));
        }
        if !not_found.is_empty() {
            let ids: Vec<String> = not_found.iter().map(text).collect();
            out.push_str(&format!("\n\nnot in the DLQ: {}", ids.join(", ")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::render;

    #[test]
    fn tables_pad_columns_and_right_align_numbers() {
        let t = render::table(
            &["NAME", "N"],
            &[false, true],
            &[
                vec!["a".into(), "5".into()],
                vec!["longer".into(), "120".into()],
            ],
        );
        assert_eq!(t, "NAME      N\na         5\nlonger  120");
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(render::duration(45.9), "45s");
        assert_eq!(render::duration(725.0), "12m05s");
        assert_eq!(render::duration(10_920.0), "3h02m");
        assert_eq!(render::duration(-1.0), "0s");
    }

    #[test]
    fn the_queue_list_shows_one_line_per_action() {
        let answer = json!({"data": [
            {"action_ref": "core.http.get", "queue_length": 5, "active_count": 2, "max_concurrent": 3,
             "oldest_age_seconds": 75.2, "total_enqueued": 100, "total_completed": 95, "enabled": true},
            {"action_ref": "core.shell", "queue_length": 0, "active_count": 0, "max_concurrent": 1,
             "oldest_age_seconds": 0.0, "total_enqueued": 1, "total_completed": 1, "enabled": false}
        ], "total": 3});
        let out = render::queues(&answer);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("ACTION"));
        assert!(lines[1].starts_with("core.http.get") && lines[1].contains("1m15s"));
        assert!(lines[2].ends_with("disabled"));
        assert_eq!(lines[3], "(2 of 3 actions)");
    }

    #[test]
    fn the_health_view_names_the_status_and_each_check() {
        let out = render::health(&json!({
            "status": "degraded", "last_check": "2026-11-22T12:00:00Z", "emergency_mode": true,
            "checks": {"dlq": {"status": "degraded", "value": 150.0, "warning": 100, "critical": 1000}}
        }));
        assert!(out.starts_with("Status: DEGRADED (checked 2026-11-22T12:00:00Z)"));
        assert!(out.contains("EMERGENCY MODE"));
        assert!(
            out.lines()
                .any(|l| l.starts_with("dlq") && l.contains("150"))
        );
        let out = render::health(&json!({"status": "healthy", "last_check": null, "checks": {}}));
        assert!(out.contains("no check has run yet"));
    }

    #[test]
    fn a_replay_report_lists_what_was_replayed_skipped_and_missing() {
        let out = render::replay(&json!({"data": {
            "replayed": [{"execution_id": null, "replay_of": 12, "action_ref": "a", "queue_from": "queued", "error_class": "QueueTimeout", "retry_count": 1}],
            "skipped": [{"execution_id": 13, "reason": "may have run"}],
            "not_found": [99], "scanned": 4
        }}));
        assert!(out.starts_with("Replayed 1, skipped 1, not found 1 (looked at 4 entries)"));
        assert!(out.contains("(new, was 12)"));
        assert!(out.contains("may have run"));
        assert!(out.ends_with("not in the DLQ: 99"));
    }

    #[test]
    fn unreadable_dlq_entries_and_purge_reports_render_without_panicking() {
        let out = render::dlq_list(
            &json!({"data": {"queue_size": 1, "entries": [{"unreadable": true, "raw": "x"}]}}),
        );
        assert!(out.contains("(unreadable)"));
        let out = render::dlq_stats(
            &json!({"data": {"queue_size": 0, "sampled": 0, "by_queue_from": {}, "by_error_class": {}}}),
        );
        assert_eq!(
            out,
            "attune.dlq: 0 messages (counts below over the first 0)"
        );
        let out = render::purge(
            &json!({"data": {"dry_run": true, "purged": 1, "queued": 1, "running": 0,
            "duration_seconds": 0.01, "entries": [{"action_ref": "a", "execution_id": 7, "state": "queued", "age_seconds": 7250.0, "limit_seconds": 7200.0}]}}),
        );
        assert!(
            out.starts_with("Dry run: 1 entries would be purged (1 queued, 0 running) in 0.01s")
        );
        assert!(out.contains("2h00m"));
        assert!(!out.contains("ledger"), "no ledger, no ledger line");
        let out = render::purge(&json!({"data": {"dry_run": false, "purged": 0, "queued": 0,
            "running": 0, "duration_seconds": 0.5, "entries": [], "ledger":
            {"completed_executions": 12, "stale_stats": 1, "old_snapshots": 0, "old_health_checks": 3}}}));
        assert!(
            out.contains(
                "ledger rows deleted: 12 finished executions, 1 idle queue_stats, 0 \
                 queue_snapshots, 3 health_checks"
            ),
            "{out}"
        );
        // Garbage in, something out.
        for f in [
            render::queues,
            render::health,
            render::purge,
            render::dlq_list,
            render::dlq_stats,
            render::replay,
        ] {
            let _ = f(&json!(null));
            let _ = f(&json!({"data": 5}));
        }
    }
}
