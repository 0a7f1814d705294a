//! Listeners: a `Send` description of a TCP listener, bound on each shard with SO_REUSEPORT so the
//! kernel spreads connections across shards, and a start-up check that turns the usual failures into
//! an error naming the address and the cause.

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Accept queue length when the caller does not choose one. The kernel caps it at
/// `net.core.somaxconn` (4096 on current kernels); 1024 absorbs a burst of new connections on one
/// shard while it is busy copying.
pub const DEFAULT_BACKLOG: u32 = 1024;

/// What to listen on and how. Plain data, so it can be sent to every shard, which binds its own copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSpec {
    /// A short name for errors and logs, e.g. "hbone" or "outbound".
    pub name: String,
    pub addr: SocketAddr,
    pub backlog: u32,
    /// TCP_NODELAY on accepted connections: a proxy must not add Nagle delay to its peers' writes.
    pub nodelay: bool,
    /// IP_FREEBIND: bind an address that is not (yet) configured on this host.
    pub freebind: bool,
    /// IP_TRANSPARENT: accept connections addressed elsewhere (TPROXY capture). Needs CAP_NET_ADMIN.
    pub transparent: bool,
}

impl ListenerSpec {
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Self {
        ListenerSpec {
            name: name.into(),
            addr,
            backlog: DEFAULT_BACKLOG,
            nodelay: true,
            freebind: false,
            transparent: false,
        }
    }

    /// Checks at start-up, on the starting thread, that the address can be had: binds it once
    /// *without* SO_REUSEPORT, so a port held by anyone — even another process that set
    /// SO_REUSEPORT itself — is refused instead of silently shared. With `replace`, binds it
    /// with SO_REUSEPORT, so a running instance's listeners (same user) are joined, as taking
    /// over from it needs. Returns the spec with port 0 replaced by the port the kernel chose, so
    /// every shard binds the same one.
    pub(crate) fn claim(&self, replace: bool) -> Result<ListenerSpec, BindError> {
        let socket = self.socket(replace)?;
        let local = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| self.error(io::Error::other("the kernel reported no local address")))?;
        let mut claimed = self.clone();
        claimed.addr.set_port(local.port());
        // The probe closes here; the shards bind next. Another process could take the port in that
        // window; then a shard's own bind fails and start-up still reports it.
        Ok(claimed)
    }

    /// Binds this shard's listener (SO_REUSEPORT on) and returns it non-blocking, ready for the
    /// shard's reactor.
    pub fn bind(&self) -> Result<StdListener, BindError> {
        let socket = self.socket(true)?;
        socket
            .listen(i32::try_from(self.backlog).unwrap_or(i32::MAX))
            .map_err(|e| self.error(e))?;
        socket.set_nonblocking(true).map_err(|e| self.error(e))?;
        Ok(socket.into())
    }

    fn socket(&self, reuseport: bool) -> Result<Socket, BindError> {
        let domain = Domain::for_address(self.addr);
        let socket =
            Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).map_err(|e| self.error(e))?;
        socket.set_reuse_address(true).map_err(|e| self.error(e))?;
        if reuseport {
            socket.set_reuse_port(true).map_err(|e| self.error(e))?;
        }
        if self.freebind {
            match self.addr {
                SocketAddr::V4(_) => socket.set_freebind_v4(true),
                SocketAddr::V6(_) => socket.set_freebind_v6(true),
            }
            .map_err(|e| self.error(e))?;
        }
        if self.transparent {
            match self.addr {
                SocketAddr::V4(_) => socket.set_ip_transparent_v4(true),
                SocketAddr::V6(_) => set_ipv6_transparent(&socket),
            }
            .map_err(|e| self.error(e))?;
        }
        if self.nodelay {
            // Inherited by accepted sockets on Linux, so they are not set one by one.
            socket.set_tcp_nodelay(true).map_err(|e| self.error(e))?;
        }
        socket.bind(&self.addr.into()).map_err(|e| self.error(e))?;
        Ok(socket)
    }

    fn error(&self, cause: io::Error) -> BindError {
        BindError {
            name: self.name.clone(),
            addr: self.addr,
            cause,
        }
    }
}

/// Where the kernel says whether connections queued on a closing listener move to another
/// listener of its SO_REUSEPORT group (Linux 5.14 and later; per network namespace).
const TCP_MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Whether connections queued on a closing listener move to the rest of its SO_REUSEPORT group:
/// `None` where the kernel does not say.
fn requests_migrate() -> Option<bool> {
    let value = std::fs::read_to_string(TCP_MIGRATE_REQ).ok()?;
    Some(value.trim() != "0")
}

/// Taking over from a running instance: says so, and warns when connections queued on its
/// listeners as it stops would be reset instead of moving to ours.
pub(crate) fn warn_unless_requests_migrate() {
    match requests_migrate() {
        Some(true) => tracing::info!(
            "replacing a running instance: listening beside it; connections queued on its listeners when it stops move to ours"
        ),
        Some(false) => tracing::warn!(
            "replacing a running instance: listening beside it, but {TCP_MIGRATE_REQ} is 0, so a connection queued on its listener in the instant it stops is reset; set net.ipv4.tcp_migrate_req=1"
        ),
        None => tracing::warn!(
            "replacing a running instance: listening beside it, but this kernel cannot move connections queued on its listener when it stops (no {TCP_MIGRATE_REQ}, Linux 5.14 and later), so one arriving in that instant is reset"
        ),
    }
}

fn set_ipv6_transparent(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A listener that could not be had, with the address, the cause and what usually fixes it.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({name}): {cause}{}", hint(.cause))]
pub struct BindError {
    pub name: String,
    pub addr: SocketAddr,
    #[source]
    pub cause: io::Error,
}

/// What usually fixes a listener's bind error, after a dash; empty when nothing general does.
pub(crate) fn hint(cause: &io::Error) -> &'static str {
    match cause.kind() {
        io::ErrorKind::AddrInUse => " — another process already listens on this port; stop it, choose another port, or start with --replace to take over from it",
        io::ErrorKind::AddrNotAvailable => " — no interface on this host has this address; use one of the host's addresses or enable freebind",
        io::ErrorKind::PermissionDenied => {
            " — ports below 1024 need CAP_NET_BIND_SERVICE and transparent listeners need CAP_NET_ADMIN"
        }
        _ => "",
    }
}
