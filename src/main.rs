//! The `herald` binary: everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    // The configuration file is read into the environment before any
    // thread exists; then the runtime starts.
    if let Err(code) = herald::cli::prepare() {
        return code;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
        .block_on(herald::cli::main())
}
