//! How the repository turns chunks and manifests into stored objects and back: the plain
//! encodings of [`crate::chunk`] and the manifest framing, followed (in an encrypted
//! repository) by the sealing stage of [`crate::crypto`].
//!
//! Owns the order of the stages and the translation between plain content hashes and stored
//! chunk names; it must not know the chunk or manifest byte layouts (those stay in their
//! modules) nor perform I/O. In an encrypted repository a manifest's chunk references carry
//! the stored name (the keyed hash), the sealed size, the raw crc32c and the raw length; the
//! plain content hash lives only inside the sealed chunk.

use std::sync::Arc;

use bytes::Bytes;
use cbt_core::ChunkRef;

use super::{ChunkContext, RepoError, Result};
use crate::chunk::{self, ChunkDecodeError, EncodedChunk};
use crate::crypto::{ObjectKind, RepoKeys, SEALED_OVERHEAD, SealError};
use crate::store::UncheckedBody;

/// A downloaded chunk object for the [`Codec`] to check and decode, with the comparison of its
/// bytes against the crc32c the store recorded still to be done when the store left it to the
/// reader ([`crate::store::ObjectStore::get_unchecked`]): the codec does it in the same pass
/// as the object's own checksum, so each byte read is checksummed once. Made from bytes the
/// store has checked (`From<Bytes>`) or from an [`UncheckedBody`]; only the codec reads it.
#[derive(Debug, Clone)]
pub struct FetchedChunk {
    body: Bytes,
    stored_crc: Option<u32>,
    /// crc32c of all but the last four bytes, when the store computed it while reading.
    before_last4: Option<u32>,
}

impl FetchedChunk {
    /// What the decoders are told besides the bytes (the last four bytes of a plain chunk
    /// and of a sealed envelope alike are the crc32c of the rest).
    fn received(&self) -> chunk::Received {
        chunk::Received {
            stored_crc: self.stored_crc,
            before_trailer: self.before_last4,
        }
    }

    /// Bytes downloaded.
    pub fn len(&self) -> usize {
        self.body.len()
    }

    /// Whether the object is empty (never true of a valid chunk).
    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }
}

impl From<Bytes> for FetchedChunk {
    fn from(body: Bytes) -> Self {
        FetchedChunk {
            body,
            stored_crc: None,
            before_last4: None,
        }
    }
}

impl From<UncheckedBody> for FetchedChunk {
    fn from(read: UncheckedBody) -> Self {
        let (body, stored_crc, before_last4) = read.into_parts();
        FetchedChunk {
            body,
            stored_crc,
            before_last4,
        }
    }
}

/// The object codec of one repository: plain, or sealed with the repository's keys. Cheap to
/// clone (worker tasks each take one).
#[derive(Debug, Clone, Default)]
pub struct Codec {
    keys: Option<Arc<RepoKeys>>,
}

impl Codec {
    /// The codec of an unencrypted repository.
    pub fn plain() -> Self {
        Codec { keys: None }
    }

    /// The codec of an encrypted repository.
    pub fn sealed(keys: Arc<RepoKeys>) -> Self {
        Codec { keys: Some(keys) }
    }

    /// Whether objects are sealed.
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    pub(crate) fn keys(&self) -> Option<&Arc<RepoKeys>> {
        self.keys.as_ref()
    }

    /// The hash a manifest records for a chunk of these raw bytes: BLAKE3, keyed (the chunk's
    /// stored name) in an encrypted repository.
    pub fn chunk_hash(&self, raw: &[u8]) -> cbt_core::ChunkHash {
        let plain = chunk::hash_raw(raw);
        match &self.keys {
            Some(keys) => keys.chunk_name(&plain),
            None => plain,
        }
    }

    /// Largest stored object a chunk of `raw_len` raw bytes can have.
    pub fn max_chunk_object_len(&self, raw_len: u64) -> u64 {
        let plain = chunk::max_object_len(raw_len);
        match self.keys {
            Some(_) => plain.saturating_add(SEALED_OVERHEAD as u64),
            None => plain,
        }
    }

    /// Encodes raw chunk bytes into the object to store and the reference to record
    /// (CPU work: call it off async threads).
    ///
    /// # Errors
    /// [`RepoError::Crypto`] if the system RNG fails (encrypted repositories only).
    pub fn encode_chunk(&self, raw: &[u8], level: i32) -> Result<EncodedChunk> {
        let Some(keys) = &self.keys else {
            return Ok(chunk::encode(raw, level));
        };
        // The encoded body is sealed in its own buffer, grown in place, not copied.
        let (plain, body, _) = chunk::encode_vec(raw, level);
        let name = keys.chunk_name(&plain.hash);
        let body = keys.seal_vec(ObjectKind::Chunk, &chunk::chunk_key(&name), body)?;
        // The store's checksum covers the bytes stored: the sealed ones. Their last four bytes
        // are the crc32c of all before them, so extending it over those four costs no pass.
        let split = body.len() - 4;
        let mut trailer = [0u8; 4];
        trailer.copy_from_slice(&body[split..]);
        let body_crc32c = crc32c::crc32c_append(u32::from_le_bytes(trailer), &trailer);
        Ok(EncodedChunk {
            chunk: ChunkRef {
                hash: name,
                stored_size: body.len() as u64,
                ..plain
            },
            body: Bytes::from(body),
            body_crc32c,
        })
    }

    /// Like [`Codec::encode_chunk`] for a chunk read into a [`chunk::RawChunk`]: in a plain
    /// repository an incompressible chunk becomes its object without a copy (its buffer returns
    /// to `home` once the body is dropped); a sealed one is encoded from the raw bytes. Also
    /// returns `raw`'s buffer when the object does not use it.
    ///
    /// # Errors
    /// As [`Codec::encode_chunk`].
    pub(crate) fn encode_chunk_in_place(
        &self,
        raw: chunk::RawChunk,
        level: i32,
        home: &crate::aligned::Shelf,
    ) -> Result<(EncodedChunk, Option<crate::aligned::AlignedBuf>)> {
        if self.keys.is_some() {
            let encoded = self.encode_chunk(raw.raw(), level)?;
            return Ok((encoded, Some(raw.into_buf())));
        }
        Ok(chunk::encode_in_place(raw, level, Some(home)))
    }

    /// Opens a sealed chunk (in place when `body` is not shared, so the engine's download is
    /// decrypted without a copy) and hands its plain object, with the reference the plain
    /// decoder checks it against, to `decode`.
    fn open_chunk<T>(
        keys: &RepoKeys,
        fetched: FetchedChunk,
        expected: &ChunkRef,
        decode: impl FnOnce(&[u8], &ChunkRef) -> std::result::Result<T, ChunkDecodeError>,
    ) -> std::result::Result<T, ChunkDecodeError> {
        let received = fetched.received();
        let body = fetched.body;
        if body.len() as u64 != expected.stored_size {
            return Err(ChunkDecodeError::Size {
                expected: expected.stored_size,
                actual: body.len() as u64,
            });
        }
        let mut buf = match body.try_into_mut() {
            Ok(owned) => owned,
            Err(shared) => bytes::BytesMut::from(&shared[..]),
        };
        let range = keys
            .open_in_place_stored(
                ObjectKind::Chunk,
                &chunk::chunk_key(&expected.hash),
                &mut buf,
                received,
            )
            .map_err(|e| match e {
                // Named as for a plain chunk: the store's checksum failed, not the envelope.
                SealError::StoredCrc { stored, computed } => {
                    ChunkDecodeError::StoredCrc { stored, computed }
                }
                other => ChunkDecodeError::Sealed(other),
            })?;
        let inner = &buf[range];
        let plain_hash = chunk::header_hash(inner).ok_or(ChunkDecodeError::Size {
            expected: chunk::OVERHEAD as u64,
            actual: inner.len() as u64,
        })?;
        // Authenticated, so written by a key holder; still, its content must be what the name
        // says.
        if keys.chunk_name(&plain_hash) != expected.hash {
            return Err(ChunkDecodeError::Mismatch(
                "the sealed chunk holds content of another name".into(),
            ));
        }
        let plain_ref = ChunkRef {
            hash: plain_hash,
            stored_size: inner.len() as u64,
            ..*expected
        };
        decode(inner, &plain_ref)
    }

    fn corrupt(expected: &ChunkRef, at: ChunkContext<'_>, reason: ChunkDecodeError) -> RepoError {
        RepoError::ChunkCorrupt {
            snapshot: at.snapshot.to_string(),
            index: at.index,
            offset: at.offset,
            key: chunk::chunk_key(&expected.hash),
            reason,
        }
    }

    /// Verifies and decodes a downloaded chunk object into `out` (CPU work: run it off the
    /// async threads). Pass the body unshared: an encrypted one is then opened in place.
    ///
    /// # Errors
    /// [`RepoError::ChunkCorrupt`] naming the failed check.
    pub fn decode_chunk(
        &self,
        body: impl Into<FetchedChunk>,
        expected: &ChunkRef,
        at: ChunkContext<'_>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let fetched = body.into();
        let result = match &self.keys {
            None => chunk::decode_into_stored(&fetched.body, fetched.received(), expected, out),
            Some(keys) => Self::open_chunk(keys, fetched, expected, |inner, r| {
                chunk::decode_into(inner, r, out)
            }),
        };
        result.map_err(|reason| Self::corrupt(expected, at, reason))
    }

    /// Like [`Codec::decode_chunk`], but into `out`, which must be exactly the chunk's raw
    /// length.
    ///
    /// # Errors
    /// [`RepoError::ChunkCorrupt`] naming the failed check.
    pub fn decode_chunk_into_slice(
        &self,
        body: impl Into<FetchedChunk>,
        expected: &ChunkRef,
        at: ChunkContext<'_>,
        out: &mut [u8],
    ) -> Result<()> {
        let fetched = body.into();
        let result = match &self.keys {
            None => {
                chunk::decode_into_slice_stored(&fetched.body, fetched.received(), expected, out)
            }
            Some(keys) => Self::open_chunk(keys, fetched, expected, |inner, r| {
                chunk::decode_into_slice(inner, r, out)
            }),
        };
        result.map_err(|reason| Self::corrupt(expected, at, reason))
    }

    /// Like [`Codec::decode_chunk_into_slice`], without copying the raw payload of an
    /// unencrypted chunk stored raw: its bytes are checked in place and returned as a slice
    /// of `body` (see [`chunk::decode_or_borrow`]). Otherwise the chunk is decoded into the
    /// buffer `out` returns for its raw length, and `None` is returned.
    ///
    /// # Errors
    /// [`RepoError::ChunkCorrupt`] naming the failed check.
    pub fn decode_chunk_or_borrow<'o>(
        &self,
        body: impl Into<FetchedChunk>,
        expected: &ChunkRef,
        at: ChunkContext<'_>,
        out: impl FnOnce(usize) -> &'o mut [u8],
    ) -> Result<Option<Bytes>> {
        let fetched = body.into();
        let result = match &self.keys {
            None => {
                let received = fetched.received();
                let body = fetched.body;
                chunk::decode_or_borrow_stored(&body, received, expected, out).map(
                    |raw| match raw {
                        chunk::RawAt::Payload(range) => Some(body.slice(range)),
                        chunk::RawAt::Out => None,
                    },
                )
            }
            Some(keys) => {
                let len = usize::try_from(expected.raw_len).unwrap_or(usize::MAX);
                Self::open_chunk(keys, fetched, expected, |inner, r| {
                    chunk::decode_into_slice(inner, r, out(len))
                })
                .map(|()| None)
            }
        };
        result.map_err(|reason| Self::corrupt(expected, at, reason))
    }

    /// Checks a downloaded chunk object exactly as [`Codec::decode_chunk`] does, keeping
    /// nothing: a raw payload is checked where it lies, a compressed one is decoded into a
    /// pooled buffer (no allocation, zeroing or copy per chunk; what `verify --read-data`
    /// needs).
    ///
    /// # Errors
    /// [`RepoError::ChunkCorrupt`] naming the failed check.
    pub fn check_chunk(
        &self,
        body: impl Into<FetchedChunk>,
        expected: &ChunkRef,
        at: ChunkContext<'_>,
    ) -> Result<()> {
        let mut buf: Option<crate::aligned::AlignedBuf> = None;
        let checked = self.decode_chunk_or_borrow(body, expected, at, |n| {
            buf.insert(crate::aligned::take(n)).resize(n)
        });
        if let Some(b) = buf {
            crate::aligned::recycle(b);
        }
        checked.map(drop)
    }

    /// Checks a stored chunk object on its own (no manifest) and returns the reference it
    /// describes, as recorded in manifests; `key` is where it is stored.
    ///
    /// # Errors
    /// A [`ChunkDecodeError`] naming the first check that failed.
    pub fn decode_standalone(
        &self,
        key: &str,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> std::result::Result<ChunkRef, ChunkDecodeError> {
        let Some(keys) = &self.keys else {
            return chunk::decode_standalone(body, out);
        };
        let inner = keys
            .open(ObjectKind::Chunk, key, body)
            .map_err(ChunkDecodeError::Sealed)?;
        let r = chunk::decode_standalone(&inner, out)?;
        Ok(ChunkRef {
            hash: keys.chunk_name(&r.hash),
            stored_size: body.len() as u64,
            ..r
        })
    }

    /// Seals a manifest's plain object for storage at `key` (returned unchanged when
    /// unencrypted).
    ///
    /// # Errors
    /// [`RepoError::Crypto`] if the system RNG fails.
    pub(crate) fn seal_object(&self, kind: ObjectKind, key: &str, plain: Bytes) -> Result<Bytes> {
        match &self.keys {
            None => Ok(plain),
            Some(keys) => Ok(Bytes::from(keys.seal(kind, key, &plain)?)),
        }
    }

    /// Opens an object read from `key` (returned unchanged when unencrypted).
    ///
    /// # Errors
    /// [`RepoError::Sealed`] if the envelope is damaged or fails authentication.
    pub(crate) fn open_object(&self, kind: ObjectKind, key: &str, body: Bytes) -> Result<Bytes> {
        match &self.keys {
            None => Ok(body),
            Some(keys) => keys
                .open(kind, key, &body)
                .map(Bytes::from)
                .map_err(|source| RepoError::Sealed {
                    key: key.to_string(),
                    source,
                }),
        }
    }
}
