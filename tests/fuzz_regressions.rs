//! The fuzz targets' inputs on stable, in every test run, without nightly or cargo-fuzz:
//! the kept corpus (`fuzz/corpus/<target>/`), every input that once crashed a target
//! (`tests/fuzz_regressions/<target>/`, each fixed since), and hostile inputs too large to
//! keep as files, all through the functions the fuzz targets call (`fifo_executor::fuzzing`).

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("request", fifo_executor::fuzzing::request),
    ("completion", fifo_executor::fuzzing::completion),
    ("cancel", fifo_executor::fuzzing::cancel),
    ("config", fifo_executor::fuzzing::config),
    ("http_body", fifo_executor::fuzzing::http_body),
];

/// Runs every file under `dir/<target>/` through its target; returns how many ran.
fn replay(dir: &Path, target: &str, run: Target) -> usize {
    let dir = dir.join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut files: Vec<_> = entries
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    files.sort();
    for file in &files {
        let data = std::fs::read(file).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} panicked", file.display());
    }
    files.len()
}

#[test]
fn the_kept_corpus_runs_clean_through_every_target() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, run) in TARGETS {
        let n = replay(&corpus, target, run);
        assert!(n > 0, "no corpus for {target}");
        println!("{target}: {n} inputs");
    }
}

#[test]
fn every_crash_the_fuzzers_found_stays_fixed() {
    let crashes = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    for (target, run) in TARGETS {
        let n = replay(&crashes, target, run);
        println!("{target}: {n} former crashes");
    }
}

/// Runs `data` through every target: none may panic, whatever the input was meant for.
fn through_all(data: &[u8]) {
    for (target, run) in TARGETS {
        let outcome = std::panic::catch_unwind(|| run(data));
        assert!(
            outcome.is_ok(),
            "{target} panicked on a {} byte input",
            data.len()
        );
    }
}

#[test]
fn hostile_inputs_too_large_to_keep_run_clean() {
    let deep = 1_000_000;
    // Deep nesting, in every place a decoder descends.
    for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
        let nested = format!("{}1{}", open.repeat(deep), close.repeat(deep));
        for body in [
            nested.clone(),
            format!("{{\"action_ref\": \"a\", \"parameters\": {{\"p\": {nested}}}}}"),
            format!("{{\"execution_id\": 1, \"status\": \"failed\", \"result\": {nested}}}"),
            format!("{{\"execution_ids\": {nested}}}"),
            format!("{{\"rate_limit\": {nested}}}"),
        ] {
            through_all(body.as_bytes());
        }
    }
    // YAML nesting, in the file and through a variable's value.
    let yaml = format!("executor: {}1{}", "[".repeat(deep), "]".repeat(deep));
    through_all(yaml.as_bytes());
    let yaml = "a:\n".to_owned() + &" b:\n".repeat(10_000);
    through_all(yaml.as_bytes());
    let env = format!("\0EXECUTOR={}", "[".repeat(deep));
    through_all(env.as_bytes());
    // A variable name of a thousand levels.
    let env = format!("\0{}=1", "A__".repeat(1000) + "A");
    through_all(env.as_bytes());
    // Bodies just over the message limit, and numbers that promise huge sizes.
    let mut big = vec![b' '; fifo_executor::fuzzing::MAX_MESSAGE_BYTES + 1];
    big[0] = b'{';
    through_all(&big);
    through_all(b"{\"limit\": 18446744073709551615, \"execution_ids\": null}");
    through_all(b"{\"execution_ids\": [18446744073709551615], \"limit\": null}");
    // Invalid UTF-8 everywhere.
    through_all(b"ct:\xff\n{\"execution_id\": 1}");
    through_all(b"{\"action_ref\": \"\xc3\x28\"}");
    through_all(b"executor:\n  x: \xff\0A\xff=\xfe");
}
