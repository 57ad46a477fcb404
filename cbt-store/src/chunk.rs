//! Chunk object codec: how one chunk's raw bytes become a self-checking stored object.
//!
//! Owns the byte layout of chunk objects and nothing else (no I/O). A chunk object is named by
//! the BLAKE3 hash of its raw bytes and laid out as:
//!
//! ```text
//! offset  size  field
//! 0       4     magic "CBCH"
//! 4       1     format version (1)
//! 5       1     codec: 0 = raw, 1 = zstd
//! 6       2     reserved, zero
//! 8       4     raw length, u32 little endian
//! 12      4     crc32c of the raw bytes, u32 LE
//! 16      32    BLAKE3 hash of the raw bytes
//! 48      n     payload (raw bytes, or one zstd frame)
//! 48+n    4     crc32c of bytes [0, 48+n), u32 LE
//! ```
//!
//! The trailer crc catches damage to the stored bytes before decompression; the hash catches
//! anything else (a decompression bug, a misnamed object). Reading checksums each stored byte
//! once (the raw crc32c of a raw payload is that pass's too) and hashes each raw byte once.
//! Data that does not
//! shrink under zstd is stored raw, so a stored chunk is at most raw length + 52 bytes; a
//! sample of each chunk decides whether a compression pass is tried at all.
//!
//! # Bounds
//! Decoding trusts nothing in the object. The raw length in the header is at most
//! [`MAX_RAW_LEN`] (the largest chunk size); a raw payload must be exactly that long; a zstd
//! payload must declare that content size if it declares one, and is decompressed into a
//! buffer of exactly the raw length, so a frame that would produce more fails instead of
//! growing memory. Objects are read with [`max_object_len`] as the limit.

use std::sync::Mutex;

use bytes::Bytes;
use cbt_core::{ChunkHash, ChunkRef};

use crate::aligned::{self, AlignedBuf};

/// Magic bytes at the start of every chunk object.
pub const CHUNK_MAGIC: [u8; 4] = *b"CBCH";
/// Chunk object format version this build writes and reads.
pub const CHUNK_FORMAT_VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 48;
/// Bytes after the payload.
pub const TRAILER_LEN: usize = 4;
/// Total framing overhead per chunk object.
pub const OVERHEAD: usize = HEADER_LEN + TRAILER_LEN;

/// Largest raw length a chunk can have (the largest chunk size).
pub const MAX_RAW_LEN: u64 = cbt_core::ranges::MAX_CHUNK_SIZE;

// Manifests accept stored sizes up to raw length + MAX_CHUNK_FRAMING; ours must fit.
const _: () = assert!(OVERHEAD as u64 <= cbt_core::manifest::MAX_CHUNK_FRAMING);

/// Largest object a chunk of `raw_len` raw bytes can be stored as (raw codec plus framing).
pub fn max_object_len(raw_len: u64) -> u64 {
    raw_len.saturating_add(OVERHEAD as u64)
}

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// Why a stored chunk object was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkDecodeError {
    /// Shorter than the framing, or shorter/longer than the manifest says.
    #[error("object is {actual} bytes, expected {expected}")]
    Size {
        /// Expected size.
        expected: u64,
        /// Actual size.
        actual: u64,
    },
    /// Does not start with the chunk magic.
    #[error("not a chunk object (bad magic)")]
    Magic,
    /// Written by a newer format.
    #[error("chunk format version {0} is not supported (this build reads version 1); upgrade cbt")]
    Version(u8),
    /// Unknown compression codec.
    #[error("unknown chunk codec {0}")]
    Codec(u8),
    /// The crc32c the store recorded for the whole object (its checksum trailer or
    /// metadata, checked in the same pass as the chunk's own trailer) does not match the
    /// bytes read.
    #[error(
        "the store's checksum of the object does not match: stored {stored:#010x}, computed {computed:#010x}"
    )]
    StoredCrc {
        /// Value the store recorded.
        stored: u32,
        /// Computed over the object as read.
        computed: u32,
    },
    /// The trailer crc32c does not match the stored bytes.
    #[error("object checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ObjectCrc {
        /// Trailer value.
        stored: u32,
        /// Computed over the object.
        computed: u32,
    },
    /// The payload does not decompress to the recorded length.
    #[error("payload does not decompress to {raw_len} bytes: {message}")]
    Decompress {
        /// Expected raw length.
        raw_len: u64,
        /// What the decoder said.
        message: String,
    },
    /// The raw bytes do not match the recorded crc32c.
    #[error("raw data crc32c {computed:#010x} does not match recorded {expected:#010x}")]
    RawCrc {
        /// Recorded value.
        expected: u32,
        /// Computed value.
        computed: u32,
    },
    /// The raw bytes do not hash to the chunk's name.
    #[error("content hash {computed} does not match chunk name {expected}")]
    Hash {
        /// The name / recorded hash (hex).
        expected: String,
        /// Hash of the decoded bytes (hex).
        computed: String,
    },
    /// The header claims more raw bytes than any chunk can have.
    #[error("header claims {raw_len} raw bytes, more than the largest chunk ({max})")]
    RawTooLarge {
        /// Claimed raw length.
        raw_len: u64,
        /// Largest chunk size.
        max: u64,
    },
    /// Header fields disagree with the manifest's reference.
    #[error("header disagrees with the manifest: {0}")]
    Mismatch(String),
    /// The encryption envelope of an encrypted repository's chunk failed (see
    /// [`crate::crypto`]).
    #[error("{0}")]
    Sealed(crate::crypto::SealError),
}

/// A chunk ready to upload: its reference (for the manifest) and its object body.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    /// Hash, stored size, raw crc32c and raw length.
    pub chunk: ChunkRef,
    /// The object body.
    pub body: Bytes,
    /// crc32c of the whole body, for [`crate::store::PutOptions::crc32c`].
    pub body_crc32c: u32,
}

/// Content hash of raw chunk bytes (BLAKE3).
pub fn hash_raw(raw: &[u8]) -> ChunkHash {
    ChunkHash(*blake3::hash(raw).as_bytes())
}

/// Object key of a chunk: `chunks/<first two hex digits>/<hash>`, fanned out for listings.
pub fn chunk_key(hash: &ChunkHash) -> String {
    let hex = hash.to_hex();
    format!("chunks/{}/{}", &hex[..2], hex)
}

/// Parses a key produced by [`chunk_key`] back into the hash (`None` for anything else).
pub fn parse_chunk_key(key: &str) -> Option<ChunkHash> {
    let rest = key.strip_prefix("chunks/")?;
    let (fan, hex) = rest.split_once('/')?;
    let hash = ChunkHash::from_hex(hex).ok()?;
    (fan.len() == 2 && hex.starts_with(fan)).then_some(hash)
}

/// zstd contexts kept for reuse. At most as many exist as chunks are encoded or decoded at
/// once (the engine's `workers` / `transfers`), and at most [`MAX_POOLED`] are kept.
static COMPRESSORS: Mutex<Vec<(i32, zstd::bulk::Compressor<'static>)>> = Mutex::new(Vec::new());
static DECOMPRESSORS: Mutex<Vec<zstd::bulk::Decompressor<'static>>> = Mutex::new(Vec::new());
const MAX_POOLED: usize = 16;

fn give_back<T>(pool: &Mutex<Vec<T>>, item: T) {
    if let Ok(mut p) = pool.lock()
        && p.len() < MAX_POOLED
    {
        p.push(item);
    }
}

/// Takes a pooled compression context for `level` (or makes one), runs `f`, and gives the
/// context back.
fn with_compressor<T>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> T,
) -> Option<T> {
    let pooled = COMPRESSORS.lock().ok().and_then(|mut p| {
        let i = p.iter().position(|(l, _)| *l == level)?;
        Some(p.swap_remove(i).1)
    });
    let mut c = match pooled {
        Some(c) => c,
        None => zstd::bulk::Compressor::new(level).ok()?,
    };
    let out = f(&mut c);
    give_back(&COMPRESSORS, (level, c));
    Some(out)
}

/// Compressed size of `raw`, if compression works and shrinks it (judging a sample).
fn compressed_len(raw: &[u8], level: i32) -> Option<usize> {
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(raw.len()));
    match with_compressor(level, |c| c.compress_to_buffer(raw, &mut out))? {
        Ok(n) if n < raw.len() => Some(n),
        _ => None,
    }
}

/// Compresses `raw` into `body[HEADER_LEN..]` (the header is filled in by the caller) as
/// one zstd frame written in place; `body` must be at least [`body_capacity`] long. The
/// frame's length, if compression works and shrinks the data.
fn compress_framed(raw: &[u8], level: i32, body: &mut [u8]) -> Option<usize> {
    let room = body.len().checked_sub(OVERHEAD)?;
    let out = &mut body[HEADER_LEN..HEADER_LEN + room];
    match with_compressor(level, |c| c.compress_to_buffer(raw, out))? {
        Ok(n) if n < raw.len() => Some(n),
        _ => None,
    }
}

fn decompress<W: zstd::zstd_safe::WriteBuf + ?Sized>(
    payload: &[u8],
    out: &mut W,
) -> std::io::Result<usize> {
    let pooled = DECOMPRESSORS.lock().ok().and_then(|mut p| p.pop());
    let mut d = match pooled {
        Some(d) => d,
        None => zstd::bulk::Decompressor::new()?,
    };
    let result = d.decompress_to_buffer(payload, out);
    give_back(&DECOMPRESSORS, d);
    result
}

/// zstd level chunk data is compressed with unless the caller picks another: level 1 is
/// several times faster than 3 for a few percent more stored bytes, and a backup is judged by
/// how long it takes.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;

/// Bytes taken from each of [`SAMPLES`] places of a chunk to judge its compressibility.
const SAMPLE_LEN: usize = 4096;
/// Places sampled, spread evenly over the chunk.
const SAMPLES: usize = 8;

/// Whether compressing `raw` is worth a full pass: chunks of at least 4× the sample size are
/// judged by compressing [`SAMPLES`] slices of [`SAMPLE_LEN`] bytes spread over the chunk (under
/// 1% of a 4 MiB chunk); unless the sample shrinks by at least 1/16, the chunk is stored raw.
/// Random, encrypted or already compressed data thus costs no compression pass; smaller
/// chunks are simply compressed.
fn worth_compressing(raw: &[u8], level: i32) -> bool {
    let total = SAMPLE_LEN * SAMPLES;
    if raw.len() < 4 * total {
        return true;
    }
    let step = (raw.len() - SAMPLE_LEN) / (SAMPLES - 1);
    let mut sample = Vec::with_capacity(total);
    for i in 0..SAMPLES {
        let at = i * step;
        sample.extend_from_slice(&raw[at..at + SAMPLE_LEN]);
    }
    compressed_len(&sample, level).is_some_and(|n| n <= total - total / 16)
}

/// Encodes `raw` (at most 4 GiB - 1 bytes) into a chunk object, compressing with zstd at
/// `level` when a sample says it pays and the result is smaller (`level <= 0` disables
/// compression). The body's buffer (at most raw length + compression bound + framing) is
/// taken from a pool and returns to it when the body is dropped.
///
/// Each raw byte is checksummed once: the trailer crc of a raw payload is derived from the
/// raw crc32c, and [`EncodedChunk::body_crc32c`] (the whole object's, for the store) from the
/// trailer, so neither the encoder nor the store reads the bytes again to checksum them.
pub fn encode(raw: &[u8], level: i32) -> EncodedChunk {
    // Aligned for direct I/O, so the local store writes a body to disk straight from here
    // (no copy into the page cache, no aligned copy).
    let cap = body_capacity(raw.len(), level);
    let mut body = aligned::take(cap);
    let (chunk, len, body_crc32c) = encode_into(raw, level, body.resize(cap));
    body.resize(len);
    EncodedChunk {
        chunk,
        body: aligned::into_bytes(body, 0..len),
        body_crc32c,
    }
}

/// A chunk's raw bytes in an aligned buffer with room for the framing on both sides, so that
/// an incompressible chunk becomes its object where it was read (see [`encode_raw_chunk`]).
///
/// The object (header, raw bytes, trailer) sits at `start` in the buffer. Usually `start` is
/// 0: the object is aligned, as the local store's direct write wants it. A source read with
/// `O_DIRECT` needs the raw bytes themselves aligned instead; the header then ends at an
/// alignment boundary (`start = raw_at - HEADER_LEN`), the object is not aligned, and the S3
/// store uploads it as it is while the local store copies it once for its own direct write.
pub struct RawChunk {
    buf: AlignedBuf,
    /// Where the object (its header) starts in `buf`.
    start: usize,
    len: usize,
}

impl RawChunk {
    /// Room for `len` raw bytes in `buf` (grown if needed; the raw bytes are whatever the
    /// buffer held: the caller fills them through [`RawChunk::raw_mut`]).
    pub(crate) fn new(buf: AlignedBuf, len: usize) -> Self {
        RawChunk::with_raw_at(buf, len, HEADER_LEN)
    }

    /// Like [`RawChunk::new`], with the raw bytes at offset `raw_at` of `buf` (at least
    /// [`HEADER_LEN`]; a multiple of a source's direct-I/O alignment so they can be read into
    /// with `O_DIRECT`).
    ///
    /// # Panics
    /// If `raw_at < HEADER_LEN` (a caller bug).
    pub(crate) fn with_raw_at(mut buf: AlignedBuf, len: usize, raw_at: usize) -> Self {
        assert!(raw_at >= HEADER_LEN, "no room for the chunk header");
        let start = raw_at - HEADER_LEN;
        buf.resize(start + len + OVERHEAD);
        RawChunk { buf, start, len }
    }

    /// Room for a chunk of `len` raw bytes, in a buffer from the process-wide pool (its
    /// contents are unspecified: fill them through [`RawChunk::raw_mut`]).
    pub fn with_len(len: usize) -> Self {
        RawChunk::new(aligned::take(len + OVERHEAD), len)
    }

    /// The raw bytes.
    pub fn raw(&self) -> &[u8] {
        let at = self.start + HEADER_LEN;
        &self.buf.as_slice()[at..at + self.len]
    }

    /// The raw bytes, to read the chunk into.
    pub fn raw_mut(&mut self) -> &mut [u8] {
        let at = self.start + HEADER_LEN;
        &mut self.buf.as_mut_slice()[at..at + self.len]
    }

    /// The buffer, for reuse.
    pub(crate) fn into_buf(self) -> AlignedBuf {
        self.buf
    }
}

/// Encodes `raw` into the same object as [`encode`] of its bytes, without copying an
/// incompressible chunk: its header and trailer are written around the raw bytes and the body
/// is `raw`'s own buffer. Every buffer returns to the process-wide pool once unused.
pub fn encode_raw_chunk(raw: RawChunk, level: i32) -> EncodedChunk {
    let (encoded, unused) = encode_in_place(raw, level, None);
    if let Some(buf) = unused {
        aligned::recycle(buf);
    }
    encoded
}

/// [`encode_raw_chunk`], with the raw buffer returning to `home` (the process-wide pool when
/// `None`) once the body is dropped when it is the object; when the chunk is compressed, the
/// object is written into a buffer from the process-wide pool and `raw`'s buffer is handed
/// back for reuse.
///
/// Unless `raw` was laid out for a direct read ([`RawChunk::with_raw_at`]), the object starts
/// at the buffer's start, so it is aligned for direct I/O like [`encode`]'s; a compressed
/// object always is.
pub(crate) fn encode_in_place(
    mut raw: RawChunk,
    level: i32,
    home: Option<&aligned::Shelf>,
) -> (EncodedChunk, Option<AlignedBuf>) {
    let len = raw.len;
    let bytes = raw.raw();
    let hash = hash_raw(bytes);
    let raw_crc = crate::crc::crc32c(bytes);
    if level > 0 && worth_compressing(bytes, level) {
        let cap = body_capacity(len, level);
        let mut body = aligned::take(cap);
        let out = body.resize(cap);
        if let Some(n) = compress_framed(bytes, level, out) {
            let (chunk, olen, crc) = frame(out, CODEC_ZSTD, &hash, raw_crc, len, n);
            body.resize(olen);
            let encoded = EncodedChunk {
                chunk,
                body: aligned::into_bytes(body, 0..olen),
                body_crc32c: crc,
            };
            return (encoded, Some(raw.buf));
        }
        aligned::recycle(body);
    }
    let start = raw.start;
    let object = &mut raw.buf.as_mut_slice()[start..];
    let (chunk, olen, crc) = frame(object, CODEC_RAW, &hash, raw_crc, len, len);
    let range = start..start + olen;
    let encoded = EncodedChunk {
        chunk,
        body: match home {
            Some(home) => aligned::into_bytes_home(raw.buf, range, home.clone()),
            None => aligned::into_bytes(raw.buf, range),
        },
        body_crc32c: crc,
    };
    (encoded, None)
}

/// Like [`encode`], but into a buffer of its own that the caller keeps (the sealing stage
/// grows it in place).
pub(crate) fn encode_vec(raw: &[u8], level: i32) -> (ChunkRef, Vec<u8>, u32) {
    // Zeroed by the allocator (fresh pages), so capacity never written is never resident.
    let mut body = vec![0; body_capacity(raw.len(), level)];
    let (chunk, len, crc) = encode_into(raw, level, &mut body);
    body.truncate(len);
    (chunk, body, crc)
}

/// Capacity an encoded body of `raw_len` raw bytes may need.
fn body_capacity(raw_len: usize, level: i32) -> usize {
    let payload = if level > 0 {
        zstd::zstd_safe::compress_bound(raw_len).max(raw_len)
    } else {
        raw_len
    };
    payload + OVERHEAD
}

/// Encodes into `body` (at least [`body_capacity`] long): returns the reference, the length
/// of the object written at the start of `body` and its crc32c.
fn encode_into(raw: &[u8], level: i32, body: &mut [u8]) -> (ChunkRef, usize, u32) {
    let hash = hash_raw(raw);
    let raw_crc = crate::crc::crc32c(raw);
    let compressed = if level > 0 && worth_compressing(raw, level) {
        compress_framed(raw, level, body)
    } else {
        None
    };
    let (codec, payload_len) = match compressed {
        Some(n) => (CODEC_ZSTD, n),
        None => {
            body[HEADER_LEN..HEADER_LEN + raw.len()].copy_from_slice(raw);
            (CODEC_RAW, raw.len())
        }
    };
    frame(body, codec, &hash, raw_crc, raw.len(), payload_len)
}

/// Writes the header and trailer around the payload already at `body[HEADER_LEN..]`
/// (`payload_len` bytes; for the raw codec, the raw bytes themselves): returns the reference,
/// the object's length and its crc32c. A raw payload is not read again (its crc is derived
/// from `raw_crc`); a compressed one is checksummed once.
fn frame(
    body: &mut [u8],
    codec: u8,
    hash: &ChunkHash,
    raw_crc: u32,
    raw_len: usize,
    payload_len: usize,
) -> (ChunkRef, usize, u32) {
    body[0..4].copy_from_slice(&CHUNK_MAGIC);
    body[4] = CHUNK_FORMAT_VERSION;
    body[5] = codec;
    body[6..8].fill(0);
    // Chunk sizes are capped at 64 MiB by cbt-core, so the length always fits.
    body[8..12].copy_from_slice(&(raw_len as u32).to_le_bytes());
    body[12..16].copy_from_slice(&raw_crc.to_le_bytes());
    body[16..48].copy_from_slice(&hash.0);
    let header_crc = crc32c::crc32c(&body[..HEADER_LEN]);
    let end = HEADER_LEN + payload_len;
    let crc = if codec == CODEC_RAW {
        crate::crc::combine(header_crc, raw_crc, raw_len)
    } else {
        crate::crc::combine(
            header_crc,
            crate::crc::crc32c(&body[HEADER_LEN..end]),
            payload_len,
        )
    };
    let trailer = crc.to_le_bytes();
    body[end..end + TRAILER_LEN].copy_from_slice(&trailer);
    let len = end + TRAILER_LEN;
    let chunk = ChunkRef {
        hash: *hash,
        stored_size: len as u64,
        crc32c: raw_crc,
        raw_len: raw_len as u64,
    };
    (chunk, len, crc32c::crc32c_append(crc, &trailer))
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Checks a stored object against the manifest's reference and decodes it into `out`
/// (cleared first; its capacity is reused).
///
/// # Errors
/// A [`ChunkDecodeError`] naming the first check that failed.
pub fn decode_into(
    body: &[u8],
    expected: &ChunkRef,
    out: &mut Vec<u8>,
) -> Result<(), ChunkDecodeError> {
    decode_into_stored(body, None, expected, out)
}

/// [`decode_into`], also comparing the crc32c the store recorded for the whole object
/// (`stored_crc`, when the store left that comparison to us) in the same pass.
pub(crate) fn decode_into_stored(
    body: &[u8],
    stored_crc: impl Into<Received>,
    expected: &ChunkRef,
    out: &mut Vec<u8>,
) -> Result<(), ChunkDecodeError> {
    let header = check_against(body, stored_crc, expected)?;
    decode_payload(body, &header, out)
}

/// Like [`decode_into`], but decodes into `out`, which must be exactly the chunk's raw length
/// (so a caller can decode straight into memory it chose, e.g. aligned for direct I/O).
///
/// # Errors
/// A [`ChunkDecodeError`] naming the first check that failed; [`ChunkDecodeError::Size`] if
/// `out` is not `expected.raw_len` bytes.
pub fn decode_into_slice(
    body: &[u8],
    expected: &ChunkRef,
    out: &mut [u8],
) -> Result<(), ChunkDecodeError> {
    decode_into_slice_stored(body, None, expected, out)
}

/// [`decode_into_slice`], comparing `stored_crc` as [`decode_into_stored`] does.
pub(crate) fn decode_into_slice_stored(
    body: &[u8],
    stored_crc: impl Into<Received>,
    expected: &ChunkRef,
    out: &mut [u8],
) -> Result<(), ChunkDecodeError> {
    if out.len() as u64 != expected.raw_len {
        return Err(ChunkDecodeError::Size {
            expected: expected.raw_len,
            actual: out.len() as u64,
        });
    }
    let h = check_against(body, stored_crc, expected)?;
    decode_exact(body, &h, out)?;
    verify_raw(out, &h)
}

/// Where [`decode_or_borrow`] left a chunk's raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawAt {
    /// The payload is stored raw: these bytes of the object are the chunk, checked in place.
    Payload(std::ops::Range<usize>),
    /// The payload was decoded into the caller's buffer.
    Out,
}

/// Checks a stored object against the manifest's reference exactly as [`decode_into_slice`]
/// does (object size, object crc32c, header, raw crc32c, BLAKE3), without copying a raw
/// payload: its raw bytes are the payload, checked where they lie, and their range in `body`
/// is returned. A compressed payload is decoded into the buffer `out` returns when asked for
/// `expected.raw_len` bytes (it must return exactly that many); `out` is not called for a
/// raw payload.
///
/// # Errors
/// A [`ChunkDecodeError`] naming the first check that failed.
pub fn decode_or_borrow<'o>(
    body: &[u8],
    expected: &ChunkRef,
    out: impl FnOnce(usize) -> &'o mut [u8],
) -> Result<RawAt, ChunkDecodeError> {
    decode_or_borrow_stored(body, None, expected, out)
}

/// [`decode_or_borrow`], comparing `stored_crc` as [`decode_into_stored`] does.
pub(crate) fn decode_or_borrow_stored<'o>(
    body: &[u8],
    stored_crc: impl Into<Received>,
    expected: &ChunkRef,
    out: impl FnOnce(usize) -> &'o mut [u8],
) -> Result<RawAt, ChunkDecodeError> {
    let h = check_against(body, stored_crc, expected)?;
    let payload = HEADER_LEN..body.len() - TRAILER_LEN;
    if h.codec == CODEC_RAW {
        // The header's raw length equals the manifest's (checked above), at most MAX_RAW_LEN.
        if payload.len() as u64 != h.raw_len {
            return Err(ChunkDecodeError::Decompress {
                raw_len: h.raw_len,
                message: format!("got {} bytes", payload.len()),
            });
        }
        verify_raw(&body[payload.clone()], &h)?;
        return Ok(RawAt::Payload(payload));
    }
    let raw_len = usize::try_from(h.raw_len).map_err(|_| ChunkDecodeError::RawTooLarge {
        raw_len: h.raw_len,
        max: MAX_RAW_LEN,
    })?;
    let out = out(raw_len);
    if out.len() != raw_len {
        return Err(ChunkDecodeError::Size {
            expected: h.raw_len,
            actual: out.len() as u64,
        });
    }
    decode_exact(body, &h, out)?;
    verify_raw(out, &h)?;
    Ok(RawAt::Out)
}

/// Decodes the payload into `out`, which is exactly the header's raw length: a raw payload
/// must be that long, a zstd frame must declare (if it declares) and produce exactly that
/// many bytes; it can never write past `out`.
fn decode_exact(body: &[u8], h: &Header, out: &mut [u8]) -> Result<(), ChunkDecodeError> {
    let payload = &body[HEADER_LEN..body.len() - TRAILER_LEN];
    let short = |message: String| ChunkDecodeError::Decompress {
        raw_len: h.raw_len,
        message,
    };
    let n = match h.codec {
        CODEC_RAW if payload.len() == out.len() => {
            out.copy_from_slice(payload);
            out.len()
        }
        CODEC_RAW => payload.len(),
        CODEC_ZSTD => {
            // A frame that announces another size is refused before any work is done.
            if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(payload)
                && declared != h.raw_len
            {
                return Err(short(format!("frame declares {declared} bytes")));
            }
            decompress(payload, out).map_err(|e| short(e.to_string()))?
        }
        other => return Err(ChunkDecodeError::Codec(other)),
    };
    if n != out.len() {
        return Err(short(format!("got {n} bytes")));
    }
    Ok(())
}

/// Checks the object's size and framing, and that its header agrees with `expected`.
fn check_against(
    body: &[u8],
    stored_crc: impl Into<Received>,
    expected: &ChunkRef,
) -> Result<Header, ChunkDecodeError> {
    if body.len() as u64 != expected.stored_size {
        return Err(ChunkDecodeError::Size {
            expected: expected.stored_size,
            actual: body.len() as u64,
        });
    }
    let header = decode_header(body, stored_crc.into())?;
    if header.hash != expected.hash {
        return Err(ChunkDecodeError::Mismatch(format!(
            "header names chunk {}",
            header.hash
        )));
    }
    if header.raw_len != expected.raw_len || header.raw_crc != expected.crc32c {
        return Err(ChunkDecodeError::Mismatch(format!(
            "header says {} bytes with crc32c {:#010x}, manifest says {} bytes with {:#010x}",
            header.raw_len, header.raw_crc, expected.raw_len, expected.crc32c
        )));
    }
    Ok(header)
}

/// Checks a stored object on its own (no manifest), as `verify` does for unreferenced data;
/// decodes into `out` and returns the chunk reference it describes.
///
/// # Errors
/// A [`ChunkDecodeError`] naming the first check that failed.
pub fn decode_standalone(body: &[u8], out: &mut Vec<u8>) -> Result<ChunkRef, ChunkDecodeError> {
    decode_standalone_stored(body, None, out)
}

/// [`decode_standalone`], comparing `stored_crc` as [`decode_into_stored`] does.
pub(crate) fn decode_standalone_stored(
    body: &[u8],
    stored_crc: impl Into<Received>,
    out: &mut Vec<u8>,
) -> Result<ChunkRef, ChunkDecodeError> {
    let header = decode_header(body, stored_crc.into())?;
    decode_payload(body, &header, out)?;
    Ok(ChunkRef {
        hash: header.hash,
        stored_size: body.len() as u64,
        crc32c: header.raw_crc,
        raw_len: header.raw_len,
    })
}

/// The content hash recorded in a chunk object's header, without checking anything else
/// (`None` if the object is shorter than a header).
pub fn header_hash(body: &[u8]) -> Option<ChunkHash> {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(body.get(16..48)?);
    Some(ChunkHash(hash))
}

/// What a store tells the decoders about an object besides its bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Received {
    /// The crc32c the store recorded for the whole object, left for the decoder to compare.
    pub(crate) stored_crc: Option<u32>,
    /// The crc32c of all the object's bytes but the trailer, computed by this process as the
    /// bytes arrived ([`crate::store::UncheckedBody::with_crc_before_last4`]), so the decoder
    /// needs no pass of its own to check the trailer and the stored crc32c.
    pub(crate) before_trailer: Option<u32>,
}

impl From<Option<u32>> for Received {
    fn from(stored_crc: Option<u32>) -> Self {
        Received {
            stored_crc,
            before_trailer: None,
        }
    }
}

struct Header {
    codec: u8,
    raw_len: u64,
    raw_crc: u32,
    /// crc32c of the stored payload (computed while checking the trailer).
    payload_crc: u32,
    hash: ChunkHash,
}

/// Checks the framing and the trailer crc32c; with `stored_crc` (the crc32c the store
/// recorded for the whole object, left for us to compare), that too, from the same pass: the
/// whole object's crc32c is the trailer's extended over the trailer's four bytes.
fn decode_header(body: &[u8], received: Received) -> Result<Header, ChunkDecodeError> {
    if body.len() < OVERHEAD {
        return Err(ChunkDecodeError::Size {
            expected: OVERHEAD as u64,
            actual: body.len() as u64,
        });
    }
    if body[0..4] != CHUNK_MAGIC {
        return Err(ChunkDecodeError::Magic);
    }
    if body[4] != CHUNK_FORMAT_VERSION {
        return Err(ChunkDecodeError::Version(body[4]));
    }
    let split = body.len() - TRAILER_LEN;
    let stored = le32(&body[split..]);
    // Header and payload checksummed apart (one pass all the same), so that a raw payload's
    // crc32c, which must equal the recorded raw crc32c, costs no second pass.
    let payload = &body[HEADER_LEN..split];
    let header_crc = crc32c::crc32c(&body[..HEADER_LEN]);
    let (payload_crc, computed) = match received.before_trailer {
        // Computed while the bytes arrived: the payload's crc32c is what remains of it once
        // the header's is taken out (crc32c(A || B) = shift(crc32c(A), |B|) ^ crc32c(B)).
        Some(before) => (
            crate::crc::combine(header_crc, before, payload.len()),
            before,
        ),
        None => {
            let payload_crc = crate::crc::crc32c(payload);
            (
                payload_crc,
                crate::crc::combine(header_crc, payload_crc, payload.len()),
            )
        }
    };
    // The store's check comes first, as it would have inside the store: damage to the
    // bytes read is reported as the store's, a trailer that disagrees with bytes the store
    // vouches for as the object's own.
    if let Some(whole) = received.stored_crc {
        let computed = crc32c::crc32c_append(computed, &body[split..]);
        if whole != computed {
            return Err(ChunkDecodeError::StoredCrc {
                stored: whole,
                computed,
            });
        }
    }
    if stored != computed {
        return Err(ChunkDecodeError::ObjectCrc { stored, computed });
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&body[16..48]);
    let raw_len = u64::from(le32(&body[8..12]));
    if raw_len > MAX_RAW_LEN {
        return Err(ChunkDecodeError::RawTooLarge {
            raw_len,
            max: MAX_RAW_LEN,
        });
    }
    // Neither codec ever stores more than the raw bytes plus framing.
    if body.len() as u64 > max_object_len(raw_len) {
        return Err(ChunkDecodeError::Size {
            expected: max_object_len(raw_len),
            actual: body.len() as u64,
        });
    }
    Ok(Header {
        codec: body[5],
        raw_len,
        raw_crc: le32(&body[12..16]),
        payload_crc,
        hash: ChunkHash(hash),
    })
}

fn decode_payload(body: &[u8], h: &Header, out: &mut Vec<u8>) -> Result<(), ChunkDecodeError> {
    let payload = &body[HEADER_LEN..body.len() - TRAILER_LEN];
    let short = |message: String| ChunkDecodeError::Decompress {
        raw_len: h.raw_len,
        message,
    };
    // Everything that can be refused without the output buffer is refused before it is
    // allocated: a few forged header bytes must not cost a 64 MiB buffer.
    match h.codec {
        CODEC_RAW if payload.len() as u64 != h.raw_len => {
            return Err(short(format!("got {} bytes", payload.len())));
        }
        CODEC_ZSTD => match zstd::zstd_safe::get_frame_content_size(payload) {
            Ok(Some(declared)) if declared != h.raw_len => {
                return Err(short(format!("frame declares {declared} bytes")));
            }
            Err(_) => return Err(short("not a zstd frame".into())),
            _ => {}
        },
        CODEC_RAW => {}
        other => return Err(ChunkDecodeError::Codec(other)),
    }
    out.clear();
    // Exactly the raw length (at most MAX_RAW_LEN, checked with the header), whatever
    // capacity a reused buffer has: the decoder cannot produce more than this.
    out.resize(h.raw_len as usize, 0);
    let decoded = decode_exact(body, h, out);
    if decoded.is_err() {
        out.clear();
    }
    decoded?;
    verify_raw(out, h)
}

/// Checks decoded bytes against the header's crc32c and content hash.
///
/// A raw payload is the raw data, so its crc32c (computed with the trailer's) is compared
/// without another pass. Decompressed data is checked by its BLAKE3 hash alone: a crc32c pass
/// over bytes that must hash to the chunk's name would catch nothing the hash does not.
fn verify_raw(out: &[u8], h: &Header) -> Result<(), ChunkDecodeError> {
    if h.codec == CODEC_RAW && h.payload_crc != h.raw_crc {
        return Err(ChunkDecodeError::RawCrc {
            expected: h.raw_crc,
            computed: h.payload_crc,
        });
    }
    let computed = hash_raw(out);
    if computed != h.hash {
        return Err(ChunkDecodeError::Hash {
            expected: h.hash.to_hex(),
            computed: computed.to_hex(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_compressible_and_random() {
        let text = b"hello block world ".repeat(500);
        let noise = noise(9000, 0x1234_5678);
        for (raw, compressed) in [(&text[..], true), (&noise[..], false)] {
            let e = encode(raw, 3);
            assert_eq!(e.body[5] == CODEC_ZSTD, compressed);
            assert!(e.body.len() <= raw.len() + OVERHEAD);
            let mut out = Vec::new();
            decode_into(&e.body, &e.chunk, &mut out).unwrap();
            assert_eq!(out, raw);
            assert_eq!(decode_standalone(&e.body, &mut out).unwrap(), e.chunk);
            let mut exact = vec![0u8; raw.len()];
            decode_into_slice(&e.body, &e.chunk, &mut exact).unwrap();
            assert_eq!(exact, raw);
            let mut short = vec![0u8; raw.len() - 1];
            assert!(matches!(
                decode_into_slice(&e.body, &e.chunk, &mut short),
                Err(ChunkDecodeError::Size { .. })
            ));
        }
        let raw_only = encode(&text, 0);
        assert_eq!(raw_only.body.len(), text.len() + OVERHEAD);
        assert_eq!(raw_only.chunk.hash, encode(&text, 3).chunk.hash);
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        cbt_core::testing::noise(seed, len)
    }

    #[test]
    fn body_crc_and_trailer_are_derived_correctly_for_every_codec_and_size() {
        let text: Vec<u8> = b"row 0001 value=abcdefgh\n".repeat(200_000)[..4 << 20].to_vec();
        let cases: Vec<(Vec<u8>, u8)> = vec![
            (noise(4 << 20, 7), CODEC_RAW),
            (text.clone(), CODEC_ZSTD),
            (noise(100, 3), CODEC_RAW),
            (b"abc".repeat(1000), CODEC_ZSTD),
            (vec![1], CODEC_RAW),
        ];
        for (raw, codec) in cases {
            for level in [0, 1, 3] {
                let e = encode(&raw, level);
                let want = if level == 0 { CODEC_RAW } else { codec };
                assert_eq!(e.body[5], want, "{} bytes at level {level}", raw.len());
                assert_eq!(e.body_crc32c, crc32c::crc32c(&e.body));
                let mut out = Vec::new();
                decode_into(&e.body, &e.chunk, &mut out).unwrap();
                assert_eq!(out, raw);
            }
        }
    }

    /// Every decoder, given the store's crc32c of the whole object to compare in its own
    /// pass, accepts the object when that crc32c is right, and otherwise refuses it with
    /// [`ChunkDecodeError::StoredCrc`]: for a store checksum that disagrees with intact bytes,
    /// and for a damaged byte (both checks fail; the store's comes first). A trailer that
    /// disagrees with bytes the store's checksum vouches for is [`ChunkDecodeError::ObjectCrc`].
    #[test]
    fn the_stored_crc_is_checked_in_the_trailer_pass_by_every_decoder() {
        let text: Vec<u8> = b"row 0001 value=abcdefgh\n".repeat(20_000);
        for raw in [noise(300_000, 9), text] {
            let e = encode(&raw, 1);
            let whole = e.body_crc32c;
            type Decoder = fn(&[u8], Option<u32>, &ChunkRef) -> Result<Vec<u8>, ChunkDecodeError>;
            let decoders: [(&str, Decoder); 4] = [
                ("into", |b, c, r| {
                    let mut out = Vec::new();
                    decode_into_stored(b, c, r, &mut out).map(|()| out)
                }),
                ("into_slice", |b, c, r| {
                    let mut out = vec![0; r.raw_len as usize];
                    decode_into_slice_stored(b, c, r, &mut out).map(|()| out)
                }),
                ("or_borrow", |b, c, r| {
                    let mut out = vec![0; r.raw_len as usize];
                    match decode_or_borrow_stored(b, c, r, |_| &mut out[..])? {
                        RawAt::Payload(range) => Ok(b[range].to_vec()),
                        RawAt::Out => Ok(out),
                    }
                }),
                ("standalone", |b, c, _| {
                    let mut out = Vec::new();
                    decode_standalone_stored(b, c, &mut out).map(|_| out)
                }),
            ];
            let mut flipped = e.body.to_vec();
            flipped[HEADER_LEN + 3] ^= 1;
            let mut trailer = e.body.to_vec();
            let t = trailer.len() - 1;
            trailer[t] ^= 0x40;
            let trailer_whole = crc32c::crc32c(&trailer);
            for (name, decode) in decoders {
                let r = &e.chunk;
                assert_eq!(decode(&e.body, Some(whole), r).unwrap(), raw, "{name}");
                assert_eq!(decode(&e.body, None, r).unwrap(), raw, "{name}");
                for (what, body, stored, ok) in [
                    ("store crc", &e.body[..], whole ^ 1, 0),
                    ("flipped", &flipped[..], whole, 0),
                    ("trailer", &trailer[..], trailer_whole, 1),
                ] {
                    let err = decode(body, Some(stored), r).unwrap_err();
                    let right = match ok {
                        0 => matches!(err, ChunkDecodeError::StoredCrc { stored: s, computed }
                            if s == stored && computed == crc32c::crc32c(body)),
                        _ => matches!(err, ChunkDecodeError::ObjectCrc { .. }),
                    };
                    assert!(right, "{name}, {what}: {err:?}");
                }
            }
        }
    }

    /// A body's buffer goes back to the pool when the body is dropped and the next chunk of
    /// a similar size is encoded into it, correctly (nothing of the previous chunk remains).
    #[test]
    fn body_buffers_are_reused_once_dropped() {
        // The pool is shared with the tests running beside this one: one of them may take the
        // buffer between the drop and the next encode, or fill the pool. Reuse must happen
        // within a few tries; without a pool it never does.
        let len = (3 << 20) + 12_345;
        let first = noise(len, 31);
        let second = noise(len - 7, 32);
        let mut reused = None;
        for _ in 0..50 {
            let e = encode(&first, 0);
            let at = e.body.as_ptr();
            drop(e);
            let e = encode(&second, 0);
            if e.body.as_ptr() == at {
                reused = Some(e);
                break;
            }
        }
        let e = reused.expect("the dropped body's buffer was never reused");
        let mut out = Vec::new();
        decode_into(&e.body, &e.chunk, &mut out).unwrap();
        assert_eq!(out, second);
        assert_eq!(e.body.len(), second.len() + OVERHEAD);
    }

    /// The raw crc32c of a raw payload is checked from the trailer pass: a header whose
    /// recorded crc disagrees with its (intact, re-trailered) payload is refused.
    #[test]
    fn a_raw_payload_that_disagrees_with_its_recorded_crc_is_refused() {
        let raw = noise(64 << 10, 21);
        let e = encode(&raw, 0);
        let mut bad = e.body.to_vec();
        let wrong = e.chunk.crc32c ^ 1;
        bad[12..16].copy_from_slice(&wrong.to_le_bytes());
        let split = bad.len() - TRAILER_LEN;
        let trailer = crc32c::crc32c(&bad[..split]).to_le_bytes();
        bad[split..].copy_from_slice(&trailer);
        let expected = ChunkRef {
            crc32c: wrong,
            ..e.chunk
        };
        let mut out = Vec::new();
        assert_eq!(
            decode_into(&bad, &expected, &mut out),
            Err(ChunkDecodeError::RawCrc {
                expected: wrong,
                computed: e.chunk.crc32c,
            })
        );
        let mut exact = vec![0u8; raw.len()];
        assert!(matches!(
            decode_into_slice(&bad, &expected, &mut exact),
            Err(ChunkDecodeError::RawCrc { .. })
        ));
    }

    #[test]
    fn the_sample_skips_incompressible_chunks_and_keeps_mixed_ones() {
        let random = noise(4 << 20, 11);
        assert!(!worth_compressing(&random, 1));
        // Half random, half text: the sample sees the text and the chunk is compressed.
        let mut mixed = noise(2 << 20, 5);
        mixed.extend(b"hello block world ".repeat(1 << 17).iter().take(2 << 20));
        assert!(worth_compressing(&mixed, 1));
        assert_eq!(encode(&mixed, 1).body[5], CODEC_ZSTD);
        // Small chunks are not sampled: compression alone decides.
        assert!(worth_compressing(&noise(64 << 10, 9), 1));
    }

    #[test]
    fn every_damage_is_detected() {
        let raw = b"some data that compresses well well well well".repeat(100);
        let e = encode(&raw, 3);
        let mut out = Vec::new();
        for pos in [0, 4, 5, 9, 13, 20, 60, e.body.len() - 1] {
            let mut bad = e.body.to_vec();
            bad[pos] ^= 0x40;
            assert!(
                decode_into(&bad, &e.chunk, &mut out).is_err(),
                "flip at {pos}"
            );
            let mut exact = vec![0u8; raw.len()];
            assert!(
                decode_into_slice(&bad, &e.chunk, &mut exact).is_err(),
                "flip at {pos} (slice)"
            );
        }
        let short = &e.body[..e.body.len() - 1];
        assert!(matches!(
            decode_into(short, &e.chunk, &mut out),
            Err(ChunkDecodeError::Size { .. })
        ));
        let mut other = e.chunk;
        other.hash = ChunkHash([7; 32]);
        assert!(matches!(
            decode_into(&e.body, &other, &mut out),
            Err(ChunkDecodeError::Mismatch(_))
        ));
        let mut future = e.body.to_vec();
        future[4] = 9;
        assert_eq!(
            decode_standalone(&future, &mut out),
            Err(ChunkDecodeError::Version(9))
        );
    }

    /// `decode_or_borrow` hands a raw payload back in place and decodes a compressed one,
    /// with the same checks as `decode_into_slice`: every flipped byte, a forged raw payload
    /// of the wrong length and a caller buffer of the wrong length are refused.
    #[test]
    fn decode_or_borrow_checks_what_decode_into_slice_checks() {
        let raw = noise(70_000, 9);
        let text = b"compressible text, compressible text ".repeat(2000);
        for (data, level) in [(&raw[..], 0), (&text[..], 3)] {
            let e = encode(data, level);
            let mut out = vec![0u8; data.len()];
            let mut asked = false;
            let got = decode_or_borrow(&e.body, &e.chunk, |n| {
                asked = true;
                &mut out[..n]
            })
            .unwrap();
            match got {
                RawAt::Payload(range) => {
                    assert_eq!(level, 0);
                    assert!(!asked, "a raw payload needs no buffer");
                    assert_eq!(&e.body[range], data);
                }
                RawAt::Out => {
                    assert_eq!(level, 3);
                    assert_eq!(out, data);
                }
            }
            let n = e.body.len();
            for pos in [0, 5, 9, 13, 20, 47, 48, 60, n / 2, n - 5, n - 1] {
                let mut bad = e.body.to_vec();
                bad[pos] ^= 0x10;
                let mut out = vec![0u8; data.len()];
                assert!(
                    decode_or_borrow(&bad, &e.chunk, |n| &mut out[..n]).is_err(),
                    "flip at {pos}, level {level}"
                );
            }
            let mut short = vec![0u8; data.len() - 1];
            if level > 0 {
                assert!(matches!(
                    decode_or_borrow(&e.body, &e.chunk, |_| &mut short[..]),
                    Err(ChunkDecodeError::Size { .. })
                ));
            }
        }
        // A raw payload one byte shorter or longer than its (manifest-agreeing) header says.
        for (len, size_error) in [(9, false), (11, true)] {
            let forged = forge(CODEC_RAW, 10, &vec![1; len]);
            let r = ChunkRef {
                hash: ChunkHash([0; 32]),
                stored_size: forged.len() as u64,
                crc32c: 0,
                raw_len: 10,
            };
            let mut out = [0u8; 10];
            match decode_or_borrow(&forged, &r, |n| &mut out[..n]) {
                Err(ChunkDecodeError::Size { .. }) if size_error => {}
                Err(ChunkDecodeError::Decompress { .. }) if !size_error => {}
                other => panic!("raw payload of {len} bytes for 10: {other:?}"),
            }
        }
    }

    /// Re-frames `payload` as a chunk object with a valid trailer (what an attacker with write
    /// access to the store can do), so the checks past the trailer crc are reached.
    fn forge(codec: u8, raw_len: u32, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![0u8; HEADER_LEN];
        body[0..4].copy_from_slice(&CHUNK_MAGIC);
        body[4] = CHUNK_FORMAT_VERSION;
        body[5] = codec;
        body[8..12].copy_from_slice(&raw_len.to_le_bytes());
        body.extend_from_slice(payload);
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        body
    }

    #[test]
    fn bombs_and_lies_are_refused_at_bounded_memory() {
        let mut out = Vec::new();
        // 64 MiB + 1 of zeros claimed by a header: refused before anything is allocated.
        let huge = forge(CODEC_ZSTD, (MAX_RAW_LEN + 1) as u32, &[0; 16]);
        assert!(matches!(
            decode_standalone(&huge, &mut out),
            Err(ChunkDecodeError::RawTooLarge { .. })
        ));
        assert_eq!(out.capacity(), 0);
        // A frame of 16 MiB of zeros (a few hundred bytes) under a header claiming 4 KiB.
        let bomb = zstd::bulk::compress(&vec![0u8; 16 << 20], 19).unwrap();
        assert!(bomb.len() < 4096);
        let framed = forge(CODEC_ZSTD, 4096, &bomb);
        assert!(matches!(
            decode_standalone(&framed, &mut out),
            Err(ChunkDecodeError::Decompress { .. })
        ));
        assert!(out.capacity() < 1 << 20, "{}", out.capacity());
        // The same without a declared content size: the decoder stops at 4 KiB.
        let mut c = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
        c.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut c, &vec![0u8; 16 << 20]).unwrap();
        let undeclared = forge(CODEC_ZSTD, 4096, &c.finish().unwrap());
        assert!(matches!(
            decode_standalone(&undeclared, &mut out),
            Err(ChunkDecodeError::Decompress { .. })
        ));
        let mut exact = vec![0u8; 4096];
        let r = ChunkRef {
            hash: ChunkHash([0; 32]),
            stored_size: undeclared.len() as u64,
            crc32c: 0,
            raw_len: 4096,
        };
        assert!(decode_into_slice(&undeclared, &r, &mut exact).is_err());
        // A raw payload longer than its header says, and an object larger than any encoding.
        assert!(decode_standalone(&forge(CODEC_RAW, 10, &[1; 11]), &mut out).is_err());
        assert!(matches!(
            decode_standalone(&forge(CODEC_RAW, 10, &[1; 200]), &mut out),
            Err(ChunkDecodeError::Size { .. })
        ));
    }

    /// Data of `len` bytes: random, text, or random with a text half (which the sample may
    /// judge either way).
    fn sample_data(kind: u8, len: usize, seed: u32) -> Vec<u8> {
        let text: Vec<u8> = b"block volume text "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect();
        match kind {
            0 => noise(len, seed.into()),
            1 => text,
            _ => {
                let mut mixed = noise(len, seed.into());
                mixed[len / 2..].copy_from_slice(&text[len / 2..]);
                mixed
            }
        }
    }

    /// Encodes `raw` in place from a buffer that held other bytes before (a reused one), the
    /// raw bytes at `raw_at` in it.
    fn in_place_at(
        raw: &[u8],
        level: i32,
        home: &aligned::Shelf,
        raw_at: usize,
    ) -> (EncodedChunk, bool) {
        let mut dirty = AlignedBuf::default();
        dirty.resize(raw.len() + OVERHEAD + 5000).fill(0xA5);
        let mut chunk = RawChunk::with_raw_at(dirty, raw.len(), raw_at);
        chunk.raw_mut().copy_from_slice(raw);
        let (e, unused) = encode_in_place(chunk, level, Some(home));
        (e, unused.is_some())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// The in-place encoder writes exactly the object the copying encoder writes, for
        /// every kind of data, level and size (including sizes that are not a multiple of the
        /// block size, as a volume's last chunk is), and its body starts aligned.
        #[test]
        fn in_place_objects_are_the_copying_encoders_bytes(
            kind in 0u8..3,
            level in proptest::sample::select(vec![0, 1, 3]),
            len in proptest::prop_oneof![
                1usize..9000,
                proptest::strategy::Strategy::prop_map(1usize..80, |b| b * 4096),
                (4096usize * 32 - 7)..(4096 * 80 + 7),
            ],
            seed in proptest::prelude::any::<u32>(),
        ) {
            let raw = sample_data(kind, len, seed);
            let home = aligned::Shelf::default();
            let old = encode(&raw, level);
            let (new, gave_back) = in_place_at(&raw, level, &home, HEADER_LEN);
            proptest::prop_assert_eq!(&new.chunk, &old.chunk);
            proptest::prop_assert_eq!(new.body_crc32c, old.body_crc32c);
            proptest::prop_assert!(new.body == old.body, "bodies differ");
            proptest::prop_assert!(aligned::is_aligned(&new.body));
            // The raw buffer is the object exactly when the chunk is stored raw.
            proptest::prop_assert_eq!(gave_back, new.body[5] == CODEC_ZSTD);
            let mut out = Vec::new();
            decode_into(&new.body, &new.chunk, &mut out).unwrap();
            proptest::prop_assert!(out == raw);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        /// Laid out for a direct read (the raw bytes at an alignment boundary, the header just
        /// before), the in-place encoder still writes exactly the copying encoder's object;
        /// a raw object then is the read buffer itself (no copy), starting where the header
        /// was put, and a compressed one starts aligned in a buffer of its own.
        #[test]
        fn objects_read_for_direct_io_are_the_copying_encoders_bytes(
            kind in 0u8..3,
            level in proptest::sample::select(vec![0, 1]),
            len in proptest::prop_oneof![
                1usize..9000,
                proptest::strategy::Strategy::prop_map(1usize..40, |b| b * 4096),
                (4096usize * 32 - 7)..(4096 * 40 + 7),
            ],
            raw_at in proptest::sample::select(vec![512usize, 4096]),
            seed in proptest::prelude::any::<u32>(),
        ) {
            let raw = sample_data(kind, len, seed);
            let home = aligned::Shelf::default();
            let old = encode(&raw, level);
            let (new, gave_back) = in_place_at(&raw, level, &home, raw_at);
            proptest::prop_assert_eq!(&new.chunk, &old.chunk);
            proptest::prop_assert_eq!(new.body_crc32c, old.body_crc32c);
            proptest::prop_assert!(new.body == old.body, "bodies differ");
            let raw_addr = new.body[HEADER_LEN..].as_ptr() as usize;
            if gave_back {
                proptest::prop_assert!(aligned::is_aligned(&new.body));
            } else {
                proptest::prop_assert!(raw_addr.is_multiple_of(raw_at));
            }
        }
    }

    /// A raw body encoded in place is the read buffer itself, and it goes back to the
    /// pipeline's shelf (not the process-wide pool) once the upload drops it.
    #[test]
    fn an_in_place_raw_body_returns_to_its_shelf() {
        let home = aligned::Shelf::default();
        let raw = noise(1 << 20, 9);
        let mut chunk = RawChunk::new(AlignedBuf::default(), raw.len());
        chunk.raw_mut().copy_from_slice(&raw);
        let at = chunk.raw().as_ptr();
        let (e, unused) = encode_in_place(chunk, 1, Some(&home));
        assert!(unused.is_none());
        assert_eq!(e.body[5], CODEC_RAW);
        assert_eq!(
            e.body[HEADER_LEN..].as_ptr(),
            at,
            "the raw bytes were copied"
        );
        assert!(home.lock().unwrap().is_empty());
        drop(e);
        assert_eq!(home.lock().unwrap().len(), 1);
    }

    /// Given the crc32c of all but the trailer (computed while the bytes arrived), every
    /// decoder checks exactly what it checks from its own pass: intact objects decode the
    /// same, a damaged payload (the crc computed over the damaged bytes, as a store would)
    /// is refused as the store's damage or, without a stored crc, as the object's.
    #[test]
    fn a_crc_computed_on_arrival_checks_what_the_decoders_own_pass_checks() {
        let text = b"arrived crc ".repeat(30_000);
        for raw in [noise(300_000, 41), text, noise(4097, 42)] {
            for level in [0, 1] {
                let e = encode(&raw, level);
                let split = e.body.len() - TRAILER_LEN;
                let received = |body: &[u8], stored| Received {
                    stored_crc: stored,
                    before_trailer: Some(crc32c::crc32c(&body[..split])),
                };
                let mut out = Vec::new();
                decode_into_stored(
                    &e.body,
                    received(&e.body, Some(e.body_crc32c)),
                    &e.chunk,
                    &mut out,
                )
                .unwrap();
                assert!(out == raw);
                let mut exact = vec![0u8; raw.len()];
                decode_into_slice_stored(&e.body, received(&e.body, None), &e.chunk, &mut exact)
                    .unwrap();
                assert!(exact == raw);
                let mut bad = e.body.to_vec();
                bad[HEADER_LEN + raw.len() / 3 % (split - HEADER_LEN)] ^= 0x40;
                assert!(matches!(
                    decode_into_stored(
                        &bad,
                        received(&bad, Some(e.body_crc32c)),
                        &e.chunk,
                        &mut out
                    ),
                    Err(ChunkDecodeError::StoredCrc { .. })
                ));
                assert!(matches!(
                    decode_or_borrow_stored(
                        &bad,
                        received(&bad, None),
                        &e.chunk,
                        |_| &mut exact[..]
                    ),
                    Err(ChunkDecodeError::ObjectCrc { .. })
                ));
            }
        }
    }

    #[test]
    fn keys_round_trip() {
        let h = hash_raw(b"x");
        let key = chunk_key(&h);
        assert!(key.starts_with("chunks/"));
        assert_eq!(parse_chunk_key(&key), Some(h));
        assert_eq!(parse_chunk_key("chunks/zz/abc"), None);
        assert_eq!(parse_chunk_key(&key.replace("chunks/", "chunks/00")), None);
    }
}
