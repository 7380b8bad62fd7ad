//! Length-prefixed, checksummed frames over a byte stream.
//!
//! Layout (all integers little-endian), a 20-byte header, the body, then a 4-byte checksum:
//!
//! | offset | size | field                                                     |
//! |--------|------|-----------------------------------------------------------|
//! | 0      | 4    | magic `b"OSTF"`                                           |
//! | 4      | 1    | protocol version ([`VERSION`])                            |
//! | 5      | 1    | frame type ([`FrameType`])                                |
//! | 6      | 2    | reserved, must be 0                                       |
//! | 8      | 8    | sequence number (data) / cumulative acknowledgement (ack) |
//! | 16     | 4    | body length `n`                                           |
//! | 20     | n    | body                                                      |
//! | 20 + n | 4    | CRC-32 (IEEE, `crc32fast`) of header and body             |
//!
//! The body length is checked against the caller's maximum before anything is allocated, so a peer
//! announcing a 4 GiB body costs nothing. Decoding never panics on arbitrary bytes.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"OSTF";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Bytes before the body.
pub const HEADER_LEN: usize = 20;
/// Bytes after the body.
pub const TRAILER_LEN: usize = 4;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Handshake opening: a fresh nonce plus the sender's limits (see `auth`).
    Hello = 1,
    /// Handshake proof: an HMAC-SHA256 tag over the transcript.
    Proof = 2,
    /// An opaque payload; `seq` numbers it.
    Data = 3,
    /// Credit return: every data frame with `seq <=` this frame's `seq` was consumed.
    Ack = 4,
}

impl FrameType {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::Proof,
            3 => Self::Data,
            4 => Self::Ack,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    pub seq: u64,
    pub body: Vec<u8>,
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad magic {0:02x?}: not an omnistage TCP frame")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("reserved header bits set ({0:#06x})")]
    Reserved(u16),
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    Oversize { len: u64, max: usize },
    #[error("checksum mismatch: frame says {expected:#010x}, content hashes to {actual:#010x}")]
    ChecksumMismatch { expected: u32, actual: u32 },
    #[error("stream ended inside a frame ({got} of {want} bytes of the {part})")]
    Truncated {
        part: &'static str,
        got: usize,
        want: usize,
    },
}

fn header(kind: FrameType, seq: u64, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = kind as u8;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&len.to_le_bytes());
    h
}

/// Encodes a frame into one buffer (tests and small frames; [`write_frame`] avoids the copy).
pub fn encode(kind: FrameType, seq: u64, body: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = body_len(body, usize::MAX)?;
    let h = header(kind, seq, len);
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TRAILER_LEN);
    out.extend_from_slice(&h);
    out.extend_from_slice(body);
    out.extend_from_slice(&checksum(&h, body).to_le_bytes());
    Ok(out)
}

fn body_len(body: &[u8], max: usize) -> Result<u32, FrameError> {
    match u32::try_from(body.len()) {
        Ok(len) if body.len() <= max => Ok(len),
        _ => Err(FrameError::Oversize {
            len: body.len() as u64,
            max: max.min(u32::MAX as usize),
        }),
    }
}

fn checksum(header: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header);
    h.update(body);
    h.finalize()
}

/// Writes one frame (header, body, checksum) without copying the body. Does not flush.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: FrameType,
    seq: u64,
    body: &[u8],
    max_body: usize,
) -> Result<(), FrameError> {
    let len = body_len(body, max_body)?;
    let h = header(kind, seq, len);
    w.write_all(&h).await?;
    w.write_all(body).await?;
    w.write_all(&checksum(&h, body).to_le_bytes()).await?;
    Ok(())
}

/// Reads until `buf` is full; returns how many bytes arrived before end of stream.
async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Reads one frame. `Ok(None)` is a clean end of stream at a frame boundary; end of stream
/// anywhere else is [`FrameError::Truncated`]. Bodies longer than `max_body` are refused from the
/// header alone, before the body is allocated or read.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_body: usize,
) -> Result<Option<Frame>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let got = fill(r, &mut h).await?;
    if got == 0 {
        return Ok(None);
    }
    let (kind, seq, len) = parse_header(&h, got, max_body)?;
    let mut body = vec![0u8; len];
    let got = fill(r, &mut body).await?;
    let mut crc = [0u8; TRAILER_LEN];
    let got_crc = if got < len {
        0
    } else {
        fill(r, &mut crc).await?
    };
    finish(&h, kind, seq, body, got, crc, got_crc).map(Some)
}

/// [`read_frame`] on a blocking reader.
pub fn read_frame_blocking<R: std::io::Read>(
    r: &mut R,
    max_body: usize,
) -> Result<Option<Frame>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let got = fill_blocking(r, &mut h)?;
    if got == 0 {
        return Ok(None);
    }
    let (kind, seq, len) = parse_header(&h, got, max_body)?;
    let mut body = vec![0u8; len];
    let got = fill_blocking(r, &mut body)?;
    let mut crc = [0u8; TRAILER_LEN];
    let got_crc = if got < len {
        0
    } else {
        fill_blocking(r, &mut crc)?
    };
    finish(&h, kind, seq, body, got, crc, got_crc).map(Some)
}

/// [`write_frame`] on a blocking writer. Does not flush.
pub fn write_frame_blocking<W: std::io::Write>(
    w: &mut W,
    kind: FrameType,
    seq: u64,
    body: &[u8],
    max_body: usize,
) -> Result<(), FrameError> {
    let len = body_len(body, max_body)?;
    let h = header(kind, seq, len);
    w.write_all(&h)?;
    w.write_all(body)?;
    w.write_all(&checksum(&h, body).to_le_bytes())?;
    Ok(())
}

fn fill_blocking<R: std::io::Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Checks a header of which `got` bytes arrived; returns its type, sequence and body length.
fn parse_header(
    h: &[u8; HEADER_LEN],
    got: usize,
    max_body: usize,
) -> Result<(FrameType, u64, usize), FrameError> {
    if got < HEADER_LEN {
        return Err(FrameError::Truncated {
            part: "header",
            got,
            want: HEADER_LEN,
        });
    }
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if h[4] != VERSION {
        return Err(FrameError::UnsupportedVersion(h[4]));
    }
    let kind = FrameType::from_u8(h[5]).ok_or(FrameError::UnknownType(h[5]))?;
    let reserved = u16::from_le_bytes([h[6], h[7]]);
    if reserved != 0 {
        return Err(FrameError::Reserved(reserved));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&h[8..16]);
    let seq = u64::from_le_bytes(seq);
    let len = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    match usize::try_from(len) {
        Ok(len) if len <= max_body => Ok((kind, seq, len)),
        _ => Err(FrameError::Oversize {
            len: len.into(),
            max: max_body,
        }),
    }
}

/// Checks that the body (`got` of its bytes arrived) and checksum (`got_crc` bytes) are whole
/// and match.
fn finish(
    h: &[u8; HEADER_LEN],
    kind: FrameType,
    seq: u64,
    body: Vec<u8>,
    got: usize,
    crc: [u8; TRAILER_LEN],
    got_crc: usize,
) -> Result<Frame, FrameError> {
    if got < body.len() {
        return Err(FrameError::Truncated {
            part: "body",
            got,
            want: body.len(),
        });
    }
    if got_crc < TRAILER_LEN {
        return Err(FrameError::Truncated {
            part: "checksum",
            got: got_crc,
            want: TRAILER_LEN,
        });
    }
    let expected = u32::from_le_bytes(crc);
    let actual = checksum(h, &body);
    if expected != actual {
        return Err(FrameError::ChecksumMismatch { expected, actual });
    }
    Ok(Frame { kind, seq, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    fn decode(bytes: &[u8], max: usize) -> Result<Option<Frame>, FrameError> {
        rt().block_on(async {
            let mut r = bytes;
            read_frame(&mut r, max).await
        })
    }

    #[test]
    fn round_trips_and_streams_back_to_back() {
        let mut stream = encode(FrameType::Data, 7, b"hello").unwrap();
        stream.extend(encode(FrameType::Ack, 7, b"").unwrap());
        rt().block_on(async {
            let mut r = &stream[..];
            let a = read_frame(&mut r, 16).await.unwrap().unwrap();
            assert_eq!(
                (a.kind, a.seq, &a.body[..]),
                (FrameType::Data, 7, &b"hello"[..])
            );
            let b = read_frame(&mut r, 16).await.unwrap().unwrap();
            assert_eq!((b.kind, b.seq, b.body.len()), (FrameType::Ack, 7, 0));
            assert!(read_frame(&mut r, 16).await.unwrap().is_none());
        });
    }

    #[test]
    fn typed_errors_for_each_corruption() {
        let good = encode(FrameType::Data, 1, b"payload").unwrap();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad, 64), Err(FrameError::BadMagic(_))));
        let mut bad = good.clone();
        bad[4] = 9;
        assert!(matches!(
            decode(&bad, 64),
            Err(FrameError::UnsupportedVersion(9))
        ));
        let mut bad = good.clone();
        bad[5] = 200;
        assert!(matches!(
            decode(&bad, 64),
            Err(FrameError::UnknownType(200))
        ));
        let mut bad = good.clone();
        bad[HEADER_LEN + 2] ^= 1;
        assert!(matches!(
            decode(&bad, 64),
            Err(FrameError::ChecksumMismatch { .. })
        ));
        assert!(matches!(
            decode(&good, 3),
            Err(FrameError::Oversize { len: 7, max: 3 })
        ));
        for cut in 1..good.len() {
            assert!(
                matches!(decode(&good[..cut], 64), Err(FrameError::Truncated { .. })),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn huge_announced_length_is_refused_without_allocating() {
        let mut h = header(FrameType::Data, 1, u32::MAX).to_vec();
        h.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode(&h, 1 << 20),
            Err(FrameError::Oversize { len, .. }) if len == u32::MAX as u64
        ));
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let good = encode(FrameType::Data, 42, &[0xAB; 100]).unwrap();
        rt().block_on(async {
            for i in 0..20_000 {
                let bytes: Vec<u8> = if i % 2 == 0 {
                    let n = rng.gen_range(0..200);
                    (0..n).map(|_| rng.gen()).collect()
                } else {
                    let mut b = good.clone();
                    for _ in 0..rng.gen_range(1..4) {
                        let at = rng.gen_range(0..b.len());
                        b[at] = rng.gen();
                    }
                    b.truncate(rng.gen_range(0..=b.len()));
                    b
                };
                let mut r = &bytes[..];
                // Any outcome is fine as long as it is a value, not a panic, and a frame that
                // decodes has a body within the limit.
                while let Ok(Some(f)) = read_frame(&mut r, 128).await {
                    assert!(f.body.len() <= 128);
                }
            }
        });
    }
}
