//! TLS 1.3 record protection (RFC 8446 §5.2) for an HBONE connection once rustls has finished
//! its handshake and handed over the traffic secrets (`rustls::kernel`, the API rustls offers for
//! kTLS, which this kernel lacks).
//!
//! Why not rustls' own connection: it allocates a buffer for every record each way, copies the
//! plaintext twice on the way in, and reads the socket one record (at most 18 KiB) at a time. Here a
//! record is opened in place in the stream's read buffer and sealed in place in its write buffer;
//! rustls still does everything else (handshake, certificates, key schedule and key updates), and
//! the AEAD is the same library rustls is built on.

use std::ops::{Deref, Range};

#[cfg(feature = "aws-lc")]
use aws_lc_rs::aead;
#[cfg(not(feature = "aws-lc"))]
use ring::aead;

use rustls::ConnectionTrafficSecrets;

/// type (1), legacy version (2), length (2).
pub const HEADER_BYTES: usize = 5;
/// AES-GCM's and ChaCha20-Poly1305's tag.
pub const TAG_BYTES: usize = 16;
/// Most content one record carries (2^14, RFC 8446 §5.1).
pub const MAX_CONTENT_BYTES: usize = 16 * 1024;
/// Most ciphertext a peer may put in one record (2^14 + 256, RFC 8446 §5.2).
pub const MAX_CIPHERTEXT_BYTES: usize = MAX_CONTENT_BYTES + 256;
/// The largest record a peer may send, header included.
pub const MAX_RECORD_BYTES: usize = HEADER_BYTES + MAX_CIPHERTEXT_BYTES;
/// What a full record adds to its content: header, inner content type, tag.
pub const RECORD_OVERHEAD_BYTES: usize = HEADER_BYTES + 1 + TAG_BYTES;

/// The outer type of every protected record, and the inner type of application data.
const APPLICATION_DATA: u8 = 23;
const LEGACY_VERSION: [u8; 2] = [3, 3];

/// What a record carries (the inner content type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentType {
    Alert,
    Handshake,
    ApplicationData,
}

impl ContentType {
    fn byte(self) -> u8 {
        match self {
            ContentType::Alert => 21,
            ContentType::Handshake => 22,
            ContentType::ApplicationData => APPLICATION_DATA,
        }
    }
}

/// Why a record could not be sealed or opened. Each ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("TLS record of {0} bytes is over the limit (record_overflow)")]
    Overflow(usize),
    #[error("TLS record with outer type {0}, not application data, after the handshake")]
    OuterType(u8),
    #[error("TLS record failed to decrypt (bad_record_mac)")]
    BadRecordMac,
    #[error("TLS record holds no content type (only padding)")]
    NoContentType,
    #[error("TLS record with unknown inner content type {0}")]
    InnerType(u8),
    #[error("TLS record sequence exhausted for this key")]
    Exhausted,
    #[error("TLS traffic secrets of an unsupported cipher")]
    Cipher,
}

/// One direction's key: the AEAD key, its IV and the next record's sequence number.
struct Key {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Key {
    fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Key, RecordError> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            #[allow(unreachable_patterns)]
            _ => return Err(RecordError::Cipher),
        };
        let unbound =
            aead::UnboundKey::new(algorithm, key.as_ref()).map_err(|_| RecordError::Cipher)?;
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| RecordError::Cipher)?;
        Ok(Key {
            key: aead::LessSafeKey::new(unbound),
            iv,
            seq,
        })
    }

    /// The per-record nonce: the IV with the sequence number XORed into its last 8 bytes
    /// (RFC 8446 §5.3). Taking it advances the sequence.
    fn next_nonce(&mut self) -> Result<aead::Nonce, RecordError> {
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or(RecordError::Exhausted)?;
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        Ok(aead::Nonce::assume_unique_for_key(nonce))
    }
}

/// Seals records into a write buffer.
pub struct Sealer {
    key: Key,
    /// Records this key may seal before it must be replaced (the suite's confidentiality limit,
    /// which rustls would enforce with a key update of its own).
    limit_records: u64,
}

impl Sealer {
    pub fn new(
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
        limit_records: u64,
    ) -> Result<Sealer, RecordError> {
        Ok(Sealer {
            key: Key::new(seq, secrets)?,
            limit_records,
        })
    }

    /// Lowers (or raises) how many records this key may seal.
    pub fn set_limit_records(&mut self, records: u64) {
        self.limit_records = records;
    }

    /// Records this key may still seal.
    pub fn records_left(&self) -> u64 {
        self.limit_records.saturating_sub(self.key.seq)
    }

    /// Appends to `out` records carrying up to `max_bytes` of `parts` (gathered in order, up to
    /// `MAX_CONTENT_BYTES` per record) as `content_type`; returns how many bytes were taken.
    pub fn seal<P: Deref<Target = [u8]>>(
        &mut self,
        content_type: ContentType,
        parts: &[P],
        max_bytes: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, RecordError> {
        let total = parts.iter().map(|p| p.len()).sum::<usize>().min(max_bytes);
        let records = total.div_ceil(MAX_CONTENT_BYTES).max(1);
        out.reserve(total + records * RECORD_OVERHEAD_BYTES);
        let mut source = Gather::new(parts);
        let mut taken = 0;
        loop {
            let record = (total - taken).min(MAX_CONTENT_BYTES);
            let start = out.len();
            out.extend_from_slice(&[0; HEADER_BYTES]);
            source.append_to(out, record);
            self.seal_appended(content_type, out, start)?;
            taken += record;
            if taken == total {
                return Ok(taken);
            }
        }
    }

    /// Appends up to `max_bytes` of `parts` to `out` as application data, filling first the
    /// record left open at `*open` by the call before. Each record that fills is sealed; the last,
    /// if not full, is left open (its start in `*open`) for the next call to go on with, so that
    /// small writes in a row (an HTTP/2 frame's header, then its payload) share records instead of
    /// each costing one. `close` seals it. Returns how many bytes were taken.
    pub fn append<P: Deref<Target = [u8]>>(
        &mut self,
        parts: &[P],
        max_bytes: usize,
        out: &mut Vec<u8>,
        open: &mut Option<usize>,
    ) -> Result<usize, RecordError> {
        let total = parts.iter().map(|p| p.len()).sum::<usize>().min(max_bytes);
        out.reserve(total + (total / MAX_CONTENT_BYTES + 2) * RECORD_OVERHEAD_BYTES);
        let mut source = Gather::new(parts);
        let mut taken = 0;
        while taken < total {
            let start = match *open {
                Some(start) => start,
                None => {
                    out.extend_from_slice(&[0; HEADER_BYTES]);
                    let start = out.len() - HEADER_BYTES;
                    *open = Some(start);
                    start
                }
            };
            let content = out.len() - start - HEADER_BYTES;
            let want = (MAX_CONTENT_BYTES - content).min(total - taken);
            source.append_to(out, want);
            taken += want;
            if out.len() - start - HEADER_BYTES == MAX_CONTENT_BYTES {
                *open = None;
                self.seal_appended(ContentType::ApplicationData, out, start)?;
            }
        }
        Ok(taken)
    }

    /// Seals the application-data record `append` left open, if any.
    pub fn close(
        &mut self,
        out: &mut Vec<u8>,
        open: &mut Option<usize>,
    ) -> Result<(), RecordError> {
        match open.take() {
            Some(start) => self.seal_appended(ContentType::ApplicationData, out, start),
            None => Ok(()),
        }
    }

    /// Seals the record whose content was appended to `out` after a header's room at `start`.
    fn seal_appended(
        &mut self,
        content_type: ContentType,
        out: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), RecordError> {
        if self.records_left() == 0 {
            return Err(RecordError::Exhausted);
        }
        out.push(content_type.byte());
        let length = out.len() - start - HEADER_BYTES + TAG_BYTES;
        let header = [
            APPLICATION_DATA,
            LEGACY_VERSION[0],
            LEGACY_VERSION[1],
            (length >> 8) as u8,
            length as u8,
        ];
        out[start..start + HEADER_BYTES].copy_from_slice(&header);
        let nonce = self.key.next_nonce()?;
        let tag = self
            .key
            .key
            .seal_in_place_separate_tag(
                nonce,
                aead::Aad::from(header),
                &mut out[start + HEADER_BYTES..],
            )
            .map_err(|_| RecordError::Exhausted)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// A caller's slices read in order, across their boundaries.
struct Gather<'a, P> {
    parts: &'a [P],
    part: usize,
    offset: usize,
}

impl<'a, P: Deref<Target = [u8]>> Gather<'a, P> {
    fn new(parts: &'a [P]) -> Self {
        Gather {
            parts,
            part: 0,
            offset: 0,
        }
    }

    /// Appends the next `bytes` to `out` (the caller has checked that the slices hold them).
    fn append_to(&mut self, out: &mut Vec<u8>, mut bytes: usize) {
        while bytes > 0 {
            let p: &[u8] = &self.parts[self.part];
            let n = (p.len() - self.offset).min(bytes);
            out.extend_from_slice(&p[self.offset..self.offset + n]);
            (bytes, self.offset) = (bytes - n, self.offset + n);
            if self.offset == p.len() {
                (self.part, self.offset) = (self.part + 1, 0);
            }
        }
    }
}

/// A record opened in place.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    /// The record's whole length in the buffer: what the next record follows.
    pub record_bytes: usize,
    pub content_type: ContentType,
    /// Where its content now lies in the buffer, as plaintext.
    pub content: Range<usize>,
}

/// Opens records in a read buffer.
pub struct Opener {
    key: Key,
}

impl Opener {
    pub fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Opener, RecordError> {
        Ok(Opener {
            key: Key::new(seq, secrets)?,
        })
    }

    /// Opens the record at the front of `buf` in place; `None` while not all of it is in.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Option<Opened>, RecordError> {
        let Some(header) = buf.first_chunk::<HEADER_BYTES>().copied() else {
            return Ok(None);
        };
        if header[0] != APPLICATION_DATA {
            return Err(RecordError::OuterType(header[0]));
        }
        let length = u16::from_be_bytes([header[3], header[4]]) as usize;
        if length > MAX_CIPHERTEXT_BYTES {
            return Err(RecordError::Overflow(length));
        }
        let record_bytes = HEADER_BYTES + length;
        let Some(ciphertext) = buf.get_mut(HEADER_BYTES..record_bytes) else {
            return Ok(None);
        };
        let nonce = self.key.next_nonce()?;
        let plaintext = self
            .key
            .key
            .open_in_place(nonce, aead::Aad::from(header), ciphertext)
            .map_err(|_| RecordError::BadRecordMac)?;
        // The content type is the last byte that is not padding (RFC 8446 §5.4).
        let at = plaintext
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(RecordError::NoContentType)?;
        if at > MAX_CONTENT_BYTES {
            return Err(RecordError::Overflow(at));
        }
        let content_type = match plaintext[at] {
            21 => ContentType::Alert,
            22 => ContentType::Handshake,
            APPLICATION_DATA => ContentType::ApplicationData,
            other => return Err(RecordError::InnerType(other)),
        };
        Ok(Some(Opened {
            record_bytes,
            content_type,
            content: HEADER_BYTES..HEADER_BYTES + at,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn secrets(byte: u8) -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([byte; 32]),
            iv: Iv::new([byte ^ 0x5a; 12]),
        }
    }

    #[test]
    fn sealed_records_open_to_what_was_sealed_across_parts_and_record_boundaries() {
        let mut sealer = Sealer::new(0, &secrets(1), u64::MAX).unwrap();
        let mut opener = Opener::new(0, &secrets(1)).unwrap();
        let a: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let b: Vec<u8> = (0..30_000u32).map(|i| (i * 7) as u8).collect();
        let mut out = Vec::new();
        let taken = sealer
            .seal(
                ContentType::ApplicationData,
                &[&a[..], &b[..]],
                usize::MAX,
                &mut out,
            )
            .unwrap();
        assert_eq!(taken, 40_000);
        let mut got = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let o = opener.open(&mut out[at..]).unwrap().unwrap();
            assert_eq!(o.content_type, ContentType::ApplicationData);
            assert!(o.content.len() <= MAX_CONTENT_BYTES);
            got.extend_from_slice(&out[at + o.content.start..at + o.content.end]);
            at += o.record_bytes;
        }
        assert_eq!(got, [a, b].concat());
    }

    #[test]
    fn appended_writes_share_records_until_the_open_one_is_closed() {
        let mut sealer = Sealer::new(0, &secrets(1), u64::MAX).unwrap();
        let mut opener = Opener::new(0, &secrets(1)).unwrap();
        let (mut out, mut open) = (Vec::new(), None);
        // An HTTP/2 DATA frame's 9-byte header, then its 16 KiB payload, three times.
        let head = [7u8; 9];
        let payload: Vec<u8> = (0..MAX_CONTENT_BYTES as u32).map(|i| i as u8).collect();
        let mut expected = Vec::new();
        for _ in 0..3 {
            let taken = sealer.append(&[&head[..]], usize::MAX, &mut out, &mut open);
            assert_eq!(taken, Ok(9));
            let taken = sealer.append(&[&payload[..]], usize::MAX, &mut out, &mut open);
            assert_eq!(taken, Ok(payload.len()));
            expected.extend_from_slice(&head);
            expected.extend_from_slice(&payload);
        }
        // max_bytes is a bound: 100 of 16 KiB are taken.
        let taken = sealer.append(&[&payload[..]], 100, &mut out, &mut open);
        assert_eq!(taken, Ok(100));
        expected.extend_from_slice(&payload[..100]);
        assert!(open.is_some(), "the last record waits for more");
        let sealed_before_close = out.len();
        sealer.close(&mut out, &mut open).unwrap();
        assert!(open.is_none());
        assert!(
            out.len() > sealed_before_close,
            "closing seals the open record"
        );
        sealer.close(&mut out, &mut open).unwrap();
        let mut records = 0;
        let (mut got, mut at) = (Vec::new(), 0);
        while at < out.len() {
            let o = opener.open(&mut out[at..]).unwrap().unwrap();
            assert_eq!(o.content_type, ContentType::ApplicationData);
            got.extend_from_slice(&out[at + o.content.start..at + o.content.end]);
            at += o.record_bytes;
            records += 1;
        }
        assert_eq!(got, expected);
        // 3 × 16,393 + 100 bytes in four records, where a record per write would take seven.
        assert_eq!(records, 4);
    }

    #[test]
    fn a_partial_record_waits_and_a_tampered_one_is_refused() {
        let mut sealer = Sealer::new(0, &secrets(2), u64::MAX).unwrap();
        let mut out = Vec::new();
        sealer
            .seal(ContentType::Alert, &[&[1u8, 0][..]], usize::MAX, &mut out)
            .unwrap();
        let mut opener = Opener::new(0, &secrets(2)).unwrap();
        let len = out.len();
        assert_eq!(opener.open(&mut out[..len - 1]).unwrap(), None);
        let mut tampered = out.clone();
        tampered[HEADER_BYTES] ^= 1;
        assert_eq!(
            Opener::new(0, &secrets(2)).unwrap().open(&mut tampered),
            Err(RecordError::BadRecordMac)
        );
        let o = opener.open(&mut out).unwrap().unwrap();
        assert_eq!(o.content_type, ContentType::Alert);
        assert_eq!(&out[o.content], &[1, 0]);
        // The wrong key, or the right key at the wrong sequence number, does not open it.
        let mut again = Vec::new();
        Sealer::new(0, &secrets(2), u64::MAX)
            .unwrap()
            .seal(ContentType::Alert, &[&[1u8, 0][..]], usize::MAX, &mut again)
            .unwrap();
        assert_eq!(
            opener.open(&mut again.clone()),
            Err(RecordError::BadRecordMac)
        );
        assert_eq!(
            Opener::new(0, &secrets(3)).unwrap().open(&mut again),
            Err(RecordError::BadRecordMac)
        );
    }

    #[test]
    fn oversized_and_non_application_data_records_are_refused() {
        let mut opener = Opener::new(0, &secrets(4)).unwrap();
        let mut big = vec![23, 3, 3, 0x41, 0x01];
        assert_eq!(opener.open(&mut big), Err(RecordError::Overflow(0x4101)));
        let mut handshake = vec![22, 3, 3, 0, 1, 0];
        assert_eq!(opener.open(&mut handshake), Err(RecordError::OuterType(22)));
    }

    #[test]
    fn a_key_seals_no_more_than_its_limit() {
        let mut sealer = Sealer::new(0, &secrets(5), 2).unwrap();
        let mut out = Vec::new();
        let content = vec![0u8; MAX_CONTENT_BYTES * 2];
        sealer
            .seal(
                ContentType::ApplicationData,
                &[&content[..]],
                usize::MAX,
                &mut out,
            )
            .unwrap();
        assert_eq!(sealer.records_left(), 0);
        assert_eq!(
            sealer.seal(
                ContentType::ApplicationData,
                &[&b"x"[..]],
                usize::MAX,
                &mut out
            ),
            Err(RecordError::Exhausted)
        );
    }
}
