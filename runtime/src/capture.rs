//! Traffic captured by the kernel: the destination a redirected connection was addressed to
//! before iptables' REDIRECT (or DNAT) rewrote it, read from the connection tracking record.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` (IPv4, `SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (IPv6, `SOL_IPV6`) share the value.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The original destination of a redirected connection; an error when it was not redirected.
pub fn original_destination(socket: &impl AsRawFd) -> io::Result<SocketAddr> {
    let fd = socket.as_raw_fd();
    // Try IPv4 first (the common case), then IPv6.
    let mut v4: libc::sockaddr_in = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `v4` is a properly sized, writable sockaddr_in and `len` says so; the kernel writes
    // at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut v4 as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc == 0 && v4.sin_family == libc::AF_INET as libc::sa_family_t {
        let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
        return Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(v4.sin_port),
        )));
    }
    let v4_error = io::Error::last_os_error();
    let mut v6: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: as above, with a sockaddr_in6.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IPV6,
            SO_ORIGINAL_DST,
            (&mut v6 as *mut libc::sockaddr_in6).cast(),
            &mut len,
        )
    };
    if rc == 0 && v6.sin6_family == libc::AF_INET6 as libc::sa_family_t {
        let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
        return Ok(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(v6.sin6_port),
            0,
            0,
        )));
    }
    Err(v4_error)
}

/// The original destination of a connection a capture listener accepted; `None` when it was not
/// redirected (no NAT record, or the record names the listener itself: forwarding it would loop).
/// `listener` is the listener's own address, from `own_address`, when it is known without asking
/// the kernel for each connection.
pub fn redirected_destination(
    socket: &monoio::net::TcpStream,
    listener: Option<SocketAddr>,
) -> Option<SocketAddr> {
    let local = listener.or_else(|| socket.local_addr().ok());
    original_destination(socket)
        .ok()
        .filter(|d| Some(*d) != local)
}

/// The local address every connection `listener` accepts has, when one is fixed: a listener bound
/// to one address and port, not transparent (REDIRECT and DNAT rewrite the destination to the
/// listener's; TPROXY would not). `None` for a wildcard or transparent listener: each connection's
/// own address must then be asked for.
pub fn own_address(listener: &crate::shard::ShardListener) -> Option<SocketAddr> {
    let bound = listener.listener.local_addr().ok()?;
    (!listener.spec.transparent && !bound.ip().is_unspecified()).then_some(bound)
}
