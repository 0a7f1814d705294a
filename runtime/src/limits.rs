//! The open-file limit a proxy needs. Every proxied connection holds two sockets (more through a
//! tunnel), and distributions still start processes with a soft limit of 1,024 open files: a node
//! proxy would refuse its 500th connection while the hard limit allows far more. Istio's ztunnel and
//! Envoy raise the soft limit to the hard one at start; so does every shoal runtime.

/// Raises the soft limit on open files to the hard limit, once per process. Returns the limit in
/// force afterwards.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    static RESULT: std::sync::OnceLock<Result<u64, std::io::ErrorKind>> =
        std::sync::OnceLock::new();
    let result = RESULT.get_or_init(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write the struct we own.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error().kind());
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                    return Err(std::io::Error::last_os_error().kind());
                }
                limit = raised;
            }
        }
        Ok(limit.rlim_cur)
    });
    result.map_err(std::io::Error::from)
}
