//! The SOCKS5 listener's side of RFC 1928: no authentication, CONNECT only. A domain name is looked
//! up among the mesh's hostnames (a Service's `name.namespace.svc.cluster.local`, a ServiceEntry
//! host); anything else is refused with the reply code that says why.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use monoio::io::{AsyncReadRentExt, AsyncWriteRentExt};
use monoio::net::TcpStream;

/// A client gets this long to finish the SOCKS5 exchange.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// RFC 1928 reply codes.
pub mod reply {
    pub const SUCCEEDED: u8 = 0;
    pub const GENERAL_FAILURE: u8 = 1;
    pub const NOT_ALLOWED: u8 = 2;
    pub const HOST_UNREACHABLE: u8 = 4;
    pub const CONNECTION_REFUSED: u8 = 5;
    pub const COMMAND_NOT_SUPPORTED: u8 = 7;
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 8;
}

/// Where the client asked to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Addr(SocketAddr),
    /// A name, with the port.
    Name(String, u16),
}

#[derive(Debug, thiserror::Error)]
pub enum Socks5Error {
    #[error("not SOCKS5 (version byte {0})")]
    Version(u8),
    #[error("the client offers no 'no authentication' method")]
    NoAcceptableMethod,
    #[error("command {0} is not CONNECT")]
    Command(u8),
    #[error("address type {0} is not supported")]
    AddressType(u8),
    #[error("the SOCKS5 exchange timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

async fn read(tcp: &mut TcpStream, n: usize) -> std::io::Result<Vec<u8>> {
    let (r, buf) = tcp.read_exact(vec![0u8; n]).await;
    r.map(|_| buf)
}

/// Reads the greeting and the CONNECT request. Refusals of the protocol itself are answered here;
/// the caller answers the CONNECT with `answer` once it knows the outcome.
pub async fn accept(tcp: &mut TcpStream) -> Result<Destination, Socks5Error> {
    match monoio::time::timeout(HANDSHAKE_TIMEOUT, exchange(tcp)).await {
        Ok(r) => r,
        Err(_) => Err(Socks5Error::Timeout),
    }
}

async fn exchange(tcp: &mut TcpStream) -> Result<Destination, Socks5Error> {
    let head = read(tcp, 2).await?;
    if head[0] != 5 {
        return Err(Socks5Error::Version(head[0]));
    }
    let methods = read(tcp, usize::from(head[1])).await?;
    if !methods.contains(&0) {
        let _ = tcp.write_all(vec![5u8, 0xff]).await;
        return Err(Socks5Error::NoAcceptableMethod);
    }
    tcp.write_all(vec![5u8, 0]).await.0?;
    let request = read(tcp, 4).await?;
    if request[0] != 5 {
        return Err(Socks5Error::Version(request[0]));
    }
    if request[1] != 1 {
        answer(tcp, reply::COMMAND_NOT_SUPPORTED).await;
        return Err(Socks5Error::Command(request[1]));
    }
    let destination = match request[3] {
        1 => {
            let b = read(tcp, 6).await?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Destination::Addr(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([b[4], b[5]]),
            ))
        }
        4 => {
            let b = read(tcp, 18).await?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[..16]);
            Destination::Addr(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                u16::from_be_bytes([b[16], b[17]]),
            ))
        }
        3 => {
            let len = read(tcp, 1).await?[0];
            let b = read(tcp, usize::from(len) + 2).await?;
            let name = String::from_utf8_lossy(&b[..usize::from(len)]).to_ascii_lowercase();
            let port = u16::from_be_bytes([b[usize::from(len)], b[usize::from(len) + 1]]);
            Destination::Name(name, port)
        }
        other => {
            answer(tcp, reply::ADDRESS_TYPE_NOT_SUPPORTED).await;
            return Err(Socks5Error::AddressType(other));
        }
    };
    Ok(destination)
}

/// Answers the CONNECT (the bound address is not meaningful here and is sent as 0.0.0.0:0).
pub async fn answer(tcp: &mut TcpStream, code: u8) {
    let _ = tcp.write_all(vec![5u8, code, 0, 1, 0, 0, 0, 0, 0, 0]).await;
}
