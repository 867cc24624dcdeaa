//! The `herald` binary: everything lives in the library; see `cli`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    herald::cli::main().await
}
