//! Deterministic byte streams and their checksums, for tests that move bytes between real peers
//! (shared by the runtime's and hbone's tests).
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};

/// A deterministic byte stream (xorshift64*), so both ends can check content, not just length.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Writes `total` bytes of `Pattern(seed)`, then shuts the write side. Returns the CRC32 sent.
pub fn send_pattern(stream: &mut TcpStream, seed: u64, total: u64) -> io::Result<u32> {
    let mut pattern = Pattern::new(seed);
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        stream.write_all(&buf[..n])?;
        crc.update(&buf[..n]);
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(crc.finalize())
}

/// Reads until EOF; returns (bytes, CRC32).
pub fn receive_all(stream: &mut TcpStream) -> io::Result<(u64, u32)> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok((total, crc.finalize()));
        }
        crc.update(&buf[..n]);
        total += n as u64;
    }
}

/// CRC32 of the first `total` bytes of `Pattern(seed)`.
pub fn pattern_crc(seed: u64, total: u64) -> u32 {
    let mut pattern = Pattern::new(seed);
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        crc.update(&buf[..n]);
        left -= n as u64;
    }
    crc.finalize()
}
