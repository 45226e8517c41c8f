//! `fifo-executor serve` as a child process of a test: started on a config file with its
//! output in a log file of its own directory, stopped with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A directory of the test's own, removed at the end.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(what: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!(
            "fifo-serve-{what}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).expect("a test directory");
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `fifo-executor serve`, its output in `dir/serve.log`, with `NOTIFY_SOCKET` set to
/// `notify` if given and removed otherwise.
pub fn serve(dir: &Path, config: &Path, notify: Option<&str>) -> Child {
    let log = std::fs::File::create(dir.join("serve.log")).expect("a log file");
    let err = log.try_clone().expect("a log handle");
    let mut command = Command::new(env!("CARGO_BIN_EXE_fifo-executor"));
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .kill_on_drop(true);
    if let Some(socket) = notify {
        command.env("NOTIFY_SOCKET", socket);
    }
    command.spawn().expect("start fifo-executor serve")
}

pub fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
}

/// Sends SIGTERM (a graceful stop) to the child.
pub async fn terminate(child: &Child) {
    let pid = child.id().expect("the child runs");
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
}

/// Waits up to `deadline` for the child to exit, and asserts it exited with success.
pub async fn exits_cleanly(child: &mut Child, dir: &Path, deadline: Duration) {
    let status = tokio::time::timeout(deadline, child.wait())
        .await
        .expect("serve stops after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status}: {}", log_of(dir));
}

/// [`terminate`], then [`exits_cleanly`].
pub async fn stop(child: &mut Child, dir: &Path, deadline: Duration) {
    terminate(child).await;
    exits_cleanly(child, dir, deadline).await;
}
