//! The binaries' log: tracing's formatter on standard error, filtered by `SHOAL_LOG`.

/// Installs the process's subscriber; `default_filter` applies when `SHOAL_LOG` is unset or invalid.
///
/// A write that fails is dropped silently. tracing-subscriber would otherwise report it with
/// `eprintln!`, which panics when standard error is a closed pipe (the process that read our log
/// has died): the panic would take the logging thread with it — the signal thread included, so
/// SIGTERM would no longer drain the process.
pub fn init(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .init();
}
