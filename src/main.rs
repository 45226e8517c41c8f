use clap::Parser;

/// See Cargo.toml: freed memory goes back to the system, which glibc's malloc did not do after
/// a hundred thousand idle actors retired.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = fifo_executor::cli::Cli::parse();
    match fifo_executor::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fifo-executor: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause only where the text so far does not already say it:
/// most of our errors quote their source in their own message, and printing the whole chain
/// repeated the innermost message once per layer.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
