//! What shoal puts on the wire, read frame by frame, against what Istio's ztunnel sends
//! (HBONE.md): the HTTP/2 SETTINGS of each side and the connection window it opens.

mod common;

use std::collections::HashMap;
use std::net::TcpListener as StdListener;

use common::*;
use monoio::net::{TcpListener, TcpStream};
use shoal_hbone::client::Connection;
use shoal_hbone::stream;
use shoal_runtime::DriverChoice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const WINDOW_UPDATE: u8 = 0x8;
const ACK: u8 = 0x1;
const DEFAULT_CONNECTION_WINDOW: u32 = 65_535;

const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

both_drivers!(
    the_server_sends_ztunnels_settings,
    the_client_sends_ztunnels_settings
);

/// Reads frames until the peer's first (non-ACK) SETTINGS and its connection WINDOW_UPDATE.
async fn settings_and_window<R: AsyncRead + Unpin>(io: &mut R) -> (HashMap<u16, u32>, u32) {
    let mut settings = None;
    let mut window = None;
    while settings.is_none() || window.is_none() {
        let mut head = [0u8; 9];
        io.read_exact(&mut head).await.expect("frame header");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await.expect("frame payload");
        match kind {
            SETTINGS if flags & ACK == 0 => {
                let map = payload
                    .chunks(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect();
                settings = Some(map);
            }
            WINDOW_UPDATE if stream == 0 => {
                window = Some(
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                        & 0x7fff_ffff,
                );
            }
            _ => {}
        }
    }
    (settings.unwrap_or_default(), window.unwrap_or_default())
}

fn the_server_sends_ztunnels_settings(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options::default(),
    );
    let (hbone, client_tls) = (n.hbone, n.client_tls.clone());
    let (settings, window) = run_on(driver, move || async move {
        let tcp = TcpStream::connect_addr(hbone).await.expect("tcp");
        let mut tls = stream::connect(tcp, hbone, client_tls).await.expect("tls");
        tls.write_all(PREFACE).await.expect("preface");
        tls.write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0])
            .await
            .expect("empty settings");
        settings_and_window(&mut tls).await
    });
    assert_eq!(
        settings.get(&SETTINGS_INITIAL_WINDOW_SIZE),
        Some(&(4 << 20)),
        "stream window 4 MiB: {settings:?}"
    );
    assert_eq!(
        settings.get(&SETTINGS_MAX_FRAME_SIZE),
        Some(&(1 << 20)),
        "max frame 1 MiB"
    );
    assert_eq!(
        settings.get(&SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(&200),
        "200 concurrent streams"
    );
    assert_eq!(
        settings.get(&SETTINGS_MAX_HEADER_LIST_SIZE),
        Some(&(64 << 10)),
        "header list 64 KiB"
    );
    assert_eq!(
        window + DEFAULT_CONNECTION_WINDOW,
        16 << 20,
        "connection window opened to 16 MiB"
    );
    drop(n);
}

fn the_client_sends_ztunnels_settings(driver: DriverChoice) {
    let upstream = StdListener::bind(loopback()).expect("upstream");
    let n = nodes(
        driver,
        upstream.local_addr().expect("addr"),
        Options::default(),
    );
    let (server_tls, client_tls) = (n.server_tls.clone(), n.client_tls.clone());
    let (preface, settings, window) = run_on(driver, move || async move {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = monoio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let (mut tls, _) = stream::accept(tcp, server_tls).await.expect("tls");
            let mut preface = vec![0u8; PREFACE.len()];
            tls.read_exact(&mut preface).await.expect("preface");
            let (settings, window) = settings_and_window(&mut tls).await;
            (preface, settings, window)
        });
        let _client = Connection::connect(addr, client_tls)
            .await
            .expect("HBONE client");
        server.await
    });
    assert_eq!(preface, PREFACE);
    assert_eq!(
        settings.get(&SETTINGS_ENABLE_PUSH),
        Some(&0),
        "push off: {settings:?}"
    );
    assert_eq!(
        settings.get(&SETTINGS_INITIAL_WINDOW_SIZE),
        Some(&(4 << 20)),
        "stream window 4 MiB"
    );
    assert_eq!(
        settings.get(&SETTINGS_MAX_FRAME_SIZE),
        Some(&(1 << 20)),
        "max frame 1 MiB"
    );
    assert_eq!(
        settings.get(&SETTINGS_MAX_HEADER_LIST_SIZE),
        Some(&(16 << 10)),
        "header list 16 KiB"
    );
    assert_eq!(
        window + DEFAULT_CONNECTION_WINDOW,
        16 << 20,
        "connection window opened to 16 MiB"
    );
    drop(n);
}
