//! The `herald` binary: everything lives in the library; see `cli`.

/// Serving a page of executions allocates a few values per column per row,
/// across threads; glibc's malloc spent about a third of the CPU of such
/// reads (arena locks, consolidation). mimalloc's thread-local heaps do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
