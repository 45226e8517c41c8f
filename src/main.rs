use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = fifo_executor::cli::Cli::parse();
    match fifo_executor::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fifo-executor: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
