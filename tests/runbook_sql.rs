//! Every SQL statement in the operators' runbook runs unchanged against our schema and, where
//! the answer can be known, tells the truth.
//!
//! The runbook is read at test time from `../shared/seeds/ops-runbook-queues.md` (next to the
//! crate); `tests/fixtures/ops-runbook-queues.md` is a copy kept in the repository, checked to
//! be identical whenever the shared one is there. Statements come from ```sql blocks and from
//! the `-c "…"` / `-c '…'` strings of `psql` commands in ```bash blocks.
//!
//! The database behind them is real: an executor with the ledger and the stats writer as its
//! ports ran executions to every state, then one queue and one execution were made to look
//! stale. UPDATEs, DELETEs and INSERTs run in a transaction that is rolled back, so every
//! statement sees the same data.

mod common_pg;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use common_pg::{Rig, TestDb, action};
use fifo_executor::core::memory::DiscardSink;
use fifo_executor::core::{ActionPolicy, PolicySource, QueueSettings};
use fifo_executor::model::{ActionRef, CancelRequest, EndStatus};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row, ValueRef};

/// How many statements the runbook holds today: 11 in ```sql blocks, 14 `psql -c` commands.
/// If the runbook changes, look at what changed and update this.
const EXPECTED_STATEMENTS: usize = 25;

fn shared_runbook() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/seeds/ops-runbook-queues.md")
}

fn fixture_runbook() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ops-runbook-queues.md")
}

fn read_runbook() -> String {
    let path = shared_runbook();
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "the operators' runbook must be at {} (the shared seeds next to the crate): {e}. \
             A copy is kept at {}.",
            path.display(),
            fixture_runbook().display()
        )
    })
}

#[test]
fn the_fixture_is_the_shared_runbook() {
    let Ok(shared) = std::fs::read_to_string(shared_runbook()) else {
        eprintln!("shared runbook absent; nothing to compare the fixture with");
        return;
    };
    let fixture = std::fs::read_to_string(fixture_runbook()).expect("fixture present");
    assert!(
        shared == fixture,
        "tests/fixtures/ops-runbook-queues.md differs from the shared runbook; copy it again"
    );
}

/// One statement and where it came from.
#[derive(Debug, Clone)]
struct Statement {
    line: usize,
    sql: String,
    /// For a `psql … -c` command: its flags other than -U/-d (e.g. `-t`).
    psql_flags: Option<Vec<String>>,
}

impl Statement {
    fn is_query(&self) -> bool {
        let first = self
            .sql
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        first == "SELECT" || first == "WITH"
    }
}

fn extract(markdown: &str) -> Vec<Statement> {
    let mut out = Vec::new();
    let mut block: Option<(String, usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        if let Some(fence) = line.trim_start().strip_prefix("```") {
            match block.take() {
                None => block = Some((fence.trim().to_owned(), i + 2, String::new())),
                Some((lang, first_line, body)) => match lang.as_str() {
                    "sql" => out.extend(split_sql(&body, first_line)),
                    "bash" => out.extend(psql_commands(&body, first_line)),
                    _ => {}
                },
            }
        } else if let Some((_, _, body)) = block.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    assert!(block.is_none(), "unterminated code block in the runbook");
    out
}

/// Splits a ```sql block at semicolons outside string literals, dropping `--` comments.
fn split_sql(body: &str, first_line: usize) -> Vec<Statement> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start_line = first_line;
    let mut line = first_line;
    let mut chars = body.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if c == '\n' {
            line += 1;
        }
        if in_string {
            current.push(c);
            in_string = c != '\'';
            continue;
        }
        match c {
            '\'' => {
                in_string = true;
                current.push(c);
            }
            '-' if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        current.push('\n');
                        break;
                    }
                }
            }
            ';' => {
                if !current.trim().is_empty() {
                    out.push(Statement {
                        line: start_line,
                        sql: current.trim().to_owned(),
                        psql_flags: None,
                    });
                }
                current.clear();
                start_line = line;
            }
            _ => {
                if current.trim().is_empty() {
                    start_line = line;
                }
                current.push(c);
            }
        }
    }
    if !current.trim().is_empty() {
        out.push(Statement {
            line: start_line,
            sql: current.trim().to_owned(),
            psql_flags: None,
        });
    }
    out
}

/// The SQL of every `psql … -c "…"` (or `-c '…'`) in a ```bash block.
fn psql_commands(body: &str, first_line: usize) -> Vec<Statement> {
    let mut out = Vec::new();
    let mut rest = body;
    let mut offset = 0;
    while let Some(at) = rest.find("psql ") {
        let after = &rest[at + 5..];
        let Some(c_at) = after.find("-c ") else {
            break;
        };
        let flags_text = &after[..c_at];
        let quoted = &after[c_at + 3..];
        let quote = quoted.chars().next().expect("a quoted SQL string after -c");
        assert!(
            quote == '"' || quote == '\'',
            "psql -c without a quoted string"
        );
        let close = quoted[1..]
            .find(quote)
            .expect("the -c string is closed in the same block");
        let sql = &quoted[1..1 + close];
        if quote == '"' {
            // Inside double quotes bash would expand these; the runbook's SQL must not need it.
            assert!(
                !sql.contains(['$', '`', '\\']),
                "bash would rewrite this SQL: {sql}"
            );
        }
        let mut flags = Vec::new();
        let mut tokens = flags_text.split_whitespace();
        while let Some(t) = tokens.next() {
            if t == "-U" || t == "-d" {
                tokens.next();
            } else {
                flags.push(t.to_owned());
            }
        }
        let consumed = at + 5 + c_at + 3 + 1 + close + 1;
        out.push(Statement {
            line: first_line + body[..offset + at].matches('\n').count(),
            sql: sql.trim().to_owned(),
            psql_flags: Some(flags),
        });
        offset += consumed;
        rest = &rest[consumed..];
    }
    out
}

#[test]
fn the_extractor_finds_every_statement_of_the_runbook() {
    let statements = extract(&read_runbook());
    let from_psql = statements.iter().filter(|s| s.psql_flags.is_some()).count();
    assert_eq!(
        (statements.len() - from_psql, from_psql),
        (11, 14),
        "{statements:#?}"
    );
    assert_eq!(statements.len(), EXPECTED_STATEMENTS);
    assert!(statements.iter().all(|s| !s.sql.contains("--")));
}

/// Per-action limits for the scenario.
struct Limits(HashMap<&'static str, u32>);

impl PolicySource for Limits {
    fn policy_for(&self, action: &ActionRef) -> ActionPolicy {
        let n = self.0.get(action.as_str()).copied().unwrap_or(1);
        common_pg::limit(n)
    }
}

const HTTP: &str = "core.http.get";
const SHELL: &str = "core.shell";
const SLOW: &str = "core.slow";
const STUCK_ID: i64 = 301;

/// The database state every runbook statement runs against. After it:
/// - `core.http.get` (limit 2): 101 succeeded, 102 and 103 running, 104 and 105 waiting,
///   106 canceled;
/// - `core.shell` (limit 1): 201 succeeded, 202 failed, 203 succeeded; idle, its stats row last
///   changed two hours ago, tagged low-priority;
/// - `core.slow` (limit 1): 301 running, accepted 25 minutes ago and not heard of for 20; its
///   stats row last changed 20 minutes ago;
/// - snapshots: one now per busy queue (by the stats writer), one of core.http.get five
///   minutes ago (empty queue), one 31 days old.
async fn scenario(db: &TestDb) -> HashMap<&'static str, i64> {
    let limits = Limits(HashMap::from([(HTTP, 2), (SHELL, 1), (SLOW, 1)]));
    let mut rig = Rig::start(
        db,
        QueueSettings::default(),
        Arc::new(limits),
        Arc::new(DiscardSink),
    )
    .await;
    let (http, shell, slow) = (action(HTTP), action(SHELL), action(SLOW));

    let _v = rig.submit(&http, 101..=106);
    let first: Vec<u64> = rig
        .next_dispatches(2)
        .await
        .iter()
        .map(|d| d.execution_id)
        .collect();
    assert_eq!(first, vec![101, 102]);
    rig.ledger.mark_running(first);
    rig.exec.cancel(vec![CancelRequest {
        execution_id: 106,
        receipt: None,
    }]);
    rig.complete(101, EndStatus::Succeeded);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 103);
    rig.ledger.mark_running(vec![103]);

    let _v = rig.submit(&shell, 201..=203);
    for (id, status) in [
        (201, EndStatus::Succeeded),
        (202, EndStatus::Failed),
        (203, EndStatus::Succeeded),
    ] {
        assert_eq!(rig.next_dispatches(1).await[0].execution_id, id);
        rig.ledger.mark_running(vec![id]);
        rig.complete(id, status);
    }

    let _v = rig.submit(&slow, [301]);
    assert_eq!(rig.next_dispatches(1).await[0].execution_id, 301);
    rig.ledger.mark_running(vec![301]);

    rig.sync().await;
    rig.stats.flush().await.expect("stats written");
    assert_eq!(rig.stats.snapshot().await.expect("snapshot"), 2);
    rig.shutdown().await;

    let ids: HashMap<&'static str, i64> = [HTTP, SHELL, SLOW]
        .into_iter()
        .map(|r| (r, rig.ids.get(&action(r)).expect("action row")))
        .collect();
    let setup = format!(
        "UPDATE attune.execution SET created = now() - interval '25 minutes', \
             enqueued_at = now() - interval '25 minutes', \
             dispatched_at = now() - interval '24 minutes', \
             updated = now() - interval '20 minutes' \
         WHERE id = {STUCK_ID}; \
         UPDATE attune.queue_stats SET last_updated = now() - interval '20 minutes' \
         WHERE action_id = {slow}; \
         UPDATE attune.queue_stats SET last_updated = now() - interval '2 hours' \
         WHERE action_id = {shell}; \
         UPDATE attune.action SET tags = '[\"low-priority\"]' WHERE id = {shell}; \
         INSERT INTO attune.queue_snapshots \
             (snapshot_time, action_id, queue_length, active_count, total_enqueued) \
         VALUES (now() - interval '5 minutes', {http}, 0, 1, 0), \
                (now() - interval '31 days', {http}, 0, 0, 0);",
        slow = ids[SLOW],
        shell = ids[SHELL],
        http = ids[HTTP],
    );
    sqlx::raw_sql(AssertSqlSafe(setup))
        .execute(&db.pool)
        .await
        .expect("stale data set up");
    ids
}

/// What a statement returned.
enum Outcome {
    Rows(Vec<PgRow>),
    Affected(u64),
}

impl Outcome {
    fn rows(&self) -> &[PgRow] {
        match self {
            Outcome::Rows(rows) => rows,
            Outcome::Affected(_) => panic!("expected rows"),
        }
    }

    fn affected(&self) -> u64 {
        match self {
            Outcome::Affected(n) => *n,
            Outcome::Rows(_) => panic!("expected a row count"),
        }
    }
}

/// The action refs of a result, whether the query calls the column `action` or `ref`.
fn refs_of(rows: &[PgRow]) -> Vec<String> {
    let column = match rows.first() {
        Some(r) if r.try_get::<String, _>("action").is_ok() => "action",
        _ => "ref",
    };
    texts(rows, column)
}

fn texts(rows: &[PgRow], column: &str) -> Vec<String> {
    rows.iter()
        .map(|r| r.try_get::<String, _>(column).expect("text column"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runbook_statement_runs_and_tells_the_truth() {
    let statements = extract(&read_runbook());
    assert_eq!(statements.len(), EXPECTED_STATEMENTS);
    let db = TestDb::new().await;
    // completion_pct needs round(double precision, integer): in `attune` for the runbook's
    // role (found through "$user") and in `public` for everyone else, this test included.
    let rounds: Vec<String> = sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE p.proname = 'round' AND p.proargtypes = '701 23'::oidvector ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .expect("pg_proc");
    assert_eq!(rounds, vec!["attune", "public"]);
    let ids = scenario(&db).await;
    let fill = |sql: &str| {
        sql.replace("<action_id>", &ids[SLOW].to_string())
            .replace("<affected_action_id>", &ids[HTTP].to_string())
            .replace("<stuck_execution_ids>", &STUCK_ID.to_string())
    };

    let mut outcomes: Vec<(Statement, Outcome)> = Vec::new();
    for st in &statements {
        let sql = fill(&st.sql);
        assert!(
            !sql.contains("<action") && !sql.contains("<stuck"),
            "unfilled placeholder at line {}: {sql}",
            st.line
        );
        let mut tx = db.pool.begin().await.expect("begin");
        let outcome = if st.is_query() {
            Outcome::Rows(
                sqlx::raw_sql(AssertSqlSafe(sql.clone()))
                    .fetch_all(&mut *tx)
                    .await
                    .unwrap_or_else(|e| panic!("runbook line {}: {e}\n{sql}", st.line)),
            )
        } else {
            Outcome::Affected(
                sqlx::raw_sql(AssertSqlSafe(sql.clone()))
                    .execute(&mut *tx)
                    .await
                    .unwrap_or_else(|e| panic!("runbook line {}: {e}\n{sql}", st.line))
                    .rows_affected(),
            )
        };
        tx.rollback().await.expect("rollback");
        if st.psql_flags.is_some() && st.is_query() {
            run_with_psql(&db, st, &sql).await;
        }
        outcomes.push((st.clone(), outcome));
    }
    let find = |needles: &[&str]| -> Vec<&Outcome> {
        let found: Vec<&Outcome> = outcomes
            .iter()
            .filter(|(st, _)| needles.iter().all(|n| st.sql.contains(n)))
            .map(|(_, o)| o)
            .collect();
        assert!(
            !found.is_empty(),
            "no runbook statement contains {needles:?}"
        );
        found
    };

    // Active queues: exactly the actions with work, longest queue first.
    for o in find(&[
        "WHERE queue_length > 0 OR active_count > 0",
        "FROM attune.queue_stats qs",
    ])
    .into_iter()
    .filter(|o| matches!(o, Outcome::Rows(_)))
    {
        assert_eq!(refs_of(o.rows()), vec![HTTP, SLOW]);
    }
    let stuck_10 = find(&["stale_minutes DESC"]);
    assert_eq!(texts(stuck_10[0].rows(), "action"), vec![SLOW]);
    let stuck_30 = find(&["INTERVAL '30 minutes'"]);
    assert!(stuck_30[0].rows().is_empty(), "nothing is 30 minutes stale");
    let overview = find(&["completion_pct", "wait_minutes"]);
    let http_row = &overview[0].rows()[0];
    assert_eq!(http_row.try_get::<i32, _>("queue_length").expect("int"), 2);
    assert_eq!(http_row.try_get::<i32, _>("active_count").expect("int"), 2);
    assert_eq!(
        http_row.try_get::<i32, _>("max_concurrent").expect("int"),
        2
    );

    // Throughput: every action that ever had work, busiest first.
    for o in find(&["ORDER BY qs.total_enqueued DESC"]) {
        assert_eq!(refs_of(o.rows()), vec![HTTP, SHELL, SLOW]);
    }

    // Nagios and the emergency watch: the longest queue and the total.
    let max = find(&["COALESCE(MAX(queue_length), 0)"]);
    assert_eq!(max[0].rows()[0].try_get::<i32, _>(0).expect("int"), 2);
    let sum = find(&["SUM(queue_length)"]);
    assert_eq!(sum[0].rows()[0].try_get::<i64, _>(0).expect("bigint"), 2);

    // Recent completions by status (core.slow's execution is 20 minutes old).
    let recent = find(&["GROUP BY status"]);
    let by_status: BTreeMap<String, i64> = recent[0]
        .rows()
        .iter()
        .map(|r| {
            (
                r.try_get::<String, _>("status").expect("status"),
                r.try_get::<i64, _>("count").expect("count"),
            )
        })
        .collect();
    let expected: BTreeMap<String, i64> = [
        ("canceled", 1),
        ("failed", 1),
        ("requested", 2),
        ("running", 2),
        ("succeeded", 3),
    ]
    .into_iter()
    .map(|(s, n)| (s.to_owned(), n))
    .collect();
    assert_eq!(by_status, expected);

    // Stuck executions: exactly the one made stale, by both queries.
    let ids_of = |o: &Outcome| -> Vec<i64> {
        o.rows()
            .iter()
            .map(|r| r.try_get::<i64, _>("id").expect("id"))
            .collect()
    };
    let stuck_running = find(&["WHERE status = 'running'"]);
    assert_eq!(ids_of(stuck_running[0]), vec![STUCK_ID]);
    let stuck_of_action = find(&["status IN ('running', 'requested')"]);
    assert_eq!(ids_of(stuck_of_action[0]), vec![STUCK_ID]);

    // The FIFO evidence: core.http.get's executions in acceptance order.
    let fifo = find(&["WHERE action = <affected_action_id>"]);
    assert_eq!(ids_of(fifo[0]), (101..=106).collect::<Vec<_>>());

    // core.slow: nothing created or completed in the last 5 minutes, one in the last hour,
    // none succeeded.
    let rate = find(&["recent_created", "recent_completed"]);
    let r = &rate[0].rows()[0];
    assert_eq!(r.try_get::<i64, _>("recent_created").expect("count"), 0);
    assert_eq!(r.try_get::<i64, _>("recent_completed").expect("count"), 0);
    let traffic = find(&["DATE_TRUNC('minute', created)"]);
    assert_eq!(traffic[0].rows().len(), 1);
    let perf = find(&["avg_duration_seconds"]);
    assert!(
        perf[0].rows()[0]
            .try_get_raw("avg_duration_seconds")
            .expect("column")
            .is_null()
    );
    let growth_plan = find(&["DATE_TRUNC('day', created)"]);
    let total: i64 = growth_plan[0]
        .rows()
        .iter()
        .map(|r| r.try_get::<i64, _>("executions").expect("count"))
        .sum();
    assert_eq!(total, 10);

    // Growth rate: core.http.get grew by 2 and took 6 new requests in five minutes.
    let growth = find(&["AS growth"]);
    let g = growth[0].rows();
    assert_eq!(texts(g, "action"), vec![HTTP]);
    assert_eq!(g[0].try_get::<i32, _>("growth").expect("int"), 2);
    assert_eq!(g[0].try_get::<i64, _>("new_requests").expect("bigint"), 6);

    // The statements that change things, each counted in its own rolled-back transaction.
    assert_eq!(find(&["SET status = 'failed'"])[0].affected(), 1);
    assert_eq!(find(&["SET enabled = false"])[0].affected(), 1);
    assert_eq!(
        find(&["INTERVAL '1 hour'\nAND queue_length = 0"])[0].affected(),
        1
    );
    assert_eq!(find(&["INTERVAL '7 days'"])[0].affected(), 0);
    assert_eq!(
        find(&["snapshot_time < NOW() - INTERVAL '30 days'"])[0].affected(),
        1
    );
    assert_eq!(
        find(&["INSERT INTO attune.queue_snapshots"])[0].affected(),
        2
    );
    find(&["CREATE TABLE IF NOT EXISTS attune.queue_snapshots"]);
}

/// Runs a runbook `psql -c` query with psql itself, flags as written, connected to the test
/// database instead of `-U attune -d attune`.
async fn run_with_psql(db: &TestDb, st: &Statement, sql: &str) {
    let opts: sqlx::postgres::PgConnectOptions = db.url.parse().expect("url");
    let out = tokio::process::Command::new("psql")
        .args(["-X", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", opts.get_host()])
        .args(["-p", &opts.get_port().to_string()])
        .args(["-U", opts.get_username()])
        .args(["-d", &db.name])
        .args(st.psql_flags.iter().flatten())
        .args(["-c", sql])
        .output()
        .await
        .expect("psql runs");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "psql at runbook line {}: {}",
        st.line,
        String::from_utf8_lossy(&out.stderr)
    );
}
