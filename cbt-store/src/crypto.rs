//! Encryption at rest: the repository key, password key slots, and the sealed-object envelope.
//!
//! Owns every cryptographic decision of the repository format and nothing else: no I/O, no
//! object keys beyond the ones handed in, no chunk or manifest layout. The repository seals an
//! object's plain encoding (a chunk object after compression, a manifest object) as one more
//! stage, and opens it before the plain decoder runs. Primitives come from `ring` (AES-256-GCM,
//! HKDF-SHA256, the system RNG), `argon2` (Argon2id) and `blake3` (keyed hashing); nothing
//! here implements a primitive.
//!
//! # Keys
//! A repository has one random 256-bit [`MasterKey`]. From it, HKDF-SHA256 derives three
//! independent values ([`RepoKeys`]): the data key that seals objects, the name key that turns
//! content hashes into chunk names, and a key id recorded in the (readable) repository config
//! so that a key that unwraps but belongs to another repository is refused. The master key is
//! stored only wrapped in key slots (`keys/<id>`): each slot holds its own random salt and the
//! Argon2id parameters that turn a password into a 256-bit wrapping key, and the master key
//! sealed with AES-256-GCM under that key (the repository id and slot id are authenticated
//! with it, so a slot cannot be moved to another repository or renamed). Adding or removing a
//! password writes or deletes one slot; no data is re-encrypted.
//!
//! Slots are read back as hostile input: they are small ([`MAX_KEY_SLOT_LEN`]) and their KDF
//! parameters must lie within [`KdfParams::validate`]'s bounds (at most [`MAX_KDF_MEMORY_KIB`]
//! of memory), so a forged slot cannot make an `open` allocate gigabytes or run for hours.
//!
//! # Chunk names
//! A chunk is named by `BLAKE3-keyed(name key, BLAKE3(raw bytes))` instead of the plain content
//! hash. Equal content still gets equal names within a repository (deduplication works), but
//! whoever can list the bucket cannot test whether it holds some known data, and two
//! repositories never give the same data the same name. The plain hash is kept only inside
//! the sealed chunk and the sealed manifest.
//!
//! # Sealed objects
//! ```text
//! offset  size  field
//! 0       4     magic "CBEN"
//! 4       1     envelope version (1)
//! 5       1     kind: 1 = chunk, 2 = manifest, 3 = lock
//! 6       2     reserved, zero
//! 8       24    object salt (random)
//! 32      12    nonce (random)
//! 44      n     AES-256-GCM ciphertext of the plain object
//! 44+n    16    GCM tag
//! 60+n    4     crc32c of bytes [0, 60+n), u32 LE
//! ```
//! The associated data is the 44-byte header followed by the object's key, so a sealed object
//! copied to another key (another chunk name, another snapshot) or relabelled as another kind
//! fails to open. The trailing crc32c covers the stored bytes, so damage is told apart from
//! tampering and `verify` can check stored objects the same way with or without encryption.
//!
//! # Nonces
//! Every object is sealed under its own key: `HKDF-Expand(data key, "cbt object v1" || kind ||
//! salt)` with a fresh random 192-bit salt, and a fresh random 96-bit nonce. GCM's limits
//! (about 2^32 messages per key with random nonces before a repeat becomes a real risk) apply
//! per derived key, and each derived key seals exactly one message. Two objects share a key
//! only if two salts collide: after 2^40 objects (a trillion) that chance is below 2^-112, and
//! nonce and salt would both have to collide for a nonce to be reused under one key. No
//! counter is kept, so concurrent writers on different hosts need no coordination. The cost is
//! one HKDF and one AES key schedule per object (microseconds against megabyte chunks).

use std::fmt;

use cbt_core::ChunkHash;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// Magic bytes at the start of every sealed object.
pub const SEALED_MAGIC: [u8; 4] = *b"CBEN";
/// Envelope version this build writes and reads.
pub const SEALED_VERSION: u8 = 1;
const SALT_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes before the ciphertext.
pub const SEALED_HEADER_LEN: usize = 8 + SALT_LEN + NONCE_LEN;
/// Bytes a sealed object adds to its plain encoding.
pub const SEALED_OVERHEAD: usize = SEALED_HEADER_LEN + TAG_LEN + 4;

/// The encryption scheme recorded in the repository config.
pub const SCHEME: &str = "aes256gcm-hkdf-blake3keyed-argon2id-v1";

/// Largest key slot object accepted (ours are about 500 bytes).
pub const MAX_KEY_SLOT_LEN: u64 = 4096;
/// Most Argon2 memory a key slot may ask for: 512 MiB (8x the default).
pub const MAX_KDF_MEMORY_KIB: u32 = 1 << 19;
/// Most Argon2 passes a key slot may ask for.
pub const MAX_KDF_ITERATIONS: u32 = 16;
/// Most Argon2 lanes a key slot may ask for.
pub const MAX_KDF_PARALLELISM: u32 = 16;
/// Longest password accepted, in bytes.
pub const MAX_PASSWORD_LEN: usize = 4096;

/// What a sealed object holds; authenticated with it, so one kind cannot pass for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A chunk object.
    Chunk = 1,
    /// A manifest object.
    Manifest = 2,
    /// A lock object.
    Lock = 3,
}

/// Why a sealed object was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// Shorter than the envelope.
    #[error("sealed object is {actual} bytes, shorter than the {min}-byte envelope")]
    TooShort {
        /// Actual size.
        actual: u64,
        /// Smallest possible sealed object.
        min: u64,
    },
    /// Not a sealed object (an unencrypted object in an encrypted repository, or garbage).
    #[error("not an encrypted object (bad magic)")]
    Magic,
    /// Sealed by a newer envelope version.
    #[error("encryption envelope version {0} is not supported (this build reads 1); upgrade cbt")]
    Version(u8),
    /// Sealed as another kind of object.
    #[error("sealed as object kind {found}, expected {expected}")]
    Kind {
        /// Kind expected here.
        expected: u8,
        /// Kind in the header.
        found: u8,
    },
    /// The stored bytes are damaged.
    #[error("object checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc {
        /// Trailer value.
        stored: u32,
        /// Computed over the object.
        computed: u32,
    },
    /// The checksum matches but decryption fails: the object was altered, moved to another key,
    /// or sealed under another repository's key.
    #[error("authentication failed: the object was modified, moved, or written with another key")]
    Authentication,
}

/// A repository's 256-bit master key. Zeroed when dropped; never printed.
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    /// A new random key from the system RNG.
    ///
    /// # Errors
    /// [`CryptoError::Random`] if the system RNG fails.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = Zeroizing::new([0u8; 32]);
        fill_random(&mut k[..])?;
        Ok(MasterKey(k))
    }

    /// The key from its 32 bytes (as exported by [`MasterKey::to_bytes`]), for tools that
    /// keep the key themselves instead of a password.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(Zeroizing::new(bytes))
    }

    /// The key's bytes (zeroed when the returned value is dropped).
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        self.0.clone()
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// A password. Zeroed when dropped; never printed.
#[derive(Clone)]
pub struct Password(Zeroizing<String>);

impl Password {
    /// A password from a string.
    ///
    /// # Errors
    /// [`CryptoError::BadPassword`] if it is empty or longer than [`MAX_PASSWORD_LEN`].
    pub fn new(password: impl Into<String>) -> Result<Self, CryptoError> {
        let p = Zeroizing::new(password.into());
        if p.is_empty() {
            return Err(CryptoError::BadPassword {
                reason: "the password is empty".into(),
            });
        }
        if p.len() > MAX_PASSWORD_LEN {
            return Err(CryptoError::BadPassword {
                reason: format!("the password is longer than {MAX_PASSWORD_LEN} bytes"),
            });
        }
        Ok(Password(p))
    }

    /// Reads a password file: its contents without one trailing newline (`\n` or `\r\n`).
    ///
    /// # Errors
    /// [`CryptoError::PasswordFile`] if it cannot be read or is not UTF-8;
    /// [`CryptoError::BadPassword`] as for [`Password::new`].
    pub fn from_file(path: &std::path::Path) -> Result<Self, CryptoError> {
        use std::io::Read;
        let failed = |reason: String| CryptoError::PasswordFile {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| failed(e.to_string()))?;
        let mut bytes = Zeroizing::new(Vec::new());
        // One byte more than a password may have, so a huge file is refused, not read.
        file.take(MAX_PASSWORD_LEN as u64 + 3)
            .read_to_end(&mut bytes)
            .map_err(|e| failed(e.to_string()))?;
        let mut text = Zeroizing::new(
            String::from_utf8(std::mem::take(&mut *bytes))
                .map_err(|_| failed("not UTF-8 text".into()))?,
        );
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        Password::new(std::mem::take(&mut *text))
    }

    fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Failures of key handling (not of sealed objects: see [`SealError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The system RNG failed.
    #[error("the system random number generator failed")]
    Random,
    /// An unusable password.
    #[error("unusable password: {reason}")]
    BadPassword {
        /// What is wrong.
        reason: String,
    },
    /// A password file cannot be read.
    #[error("cannot read password file {}: {reason}", path.display())]
    PasswordFile {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        reason: String,
    },
    /// KDF parameters outside the accepted bounds.
    #[error("key derivation parameters out of bounds: {reason}")]
    KdfParams {
        /// Which bound.
        reason: String,
    },
}

/// Argon2id parameters of one key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl KdfParams {
    /// The parameters new slots get: 64 MiB, 3 passes, 1 lane (about a quarter of a second on
    /// one core of a current server; an attacker pays the same per guess).
    pub const DEFAULT: KdfParams = KdfParams {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 1,
    };

    /// Checks the parameters against the bounds a slot read from storage must respect.
    ///
    /// # Errors
    /// [`CryptoError::KdfParams`] naming the violated bound.
    pub fn validate(&self) -> Result<(), CryptoError> {
        let bad = |reason: String| Err(CryptoError::KdfParams { reason });
        if self.parallelism == 0 || self.parallelism > MAX_KDF_PARALLELISM {
            return bad(format!(
                "parallelism {} (allowed 1..={MAX_KDF_PARALLELISM})",
                self.parallelism
            ));
        }
        if self.iterations == 0 || self.iterations > MAX_KDF_ITERATIONS {
            return bad(format!(
                "iterations {} (allowed 1..={MAX_KDF_ITERATIONS})",
                self.iterations
            ));
        }
        let min = 8 * self.parallelism;
        if self.memory_kib < min || self.memory_kib > MAX_KDF_MEMORY_KIB {
            return bad(format!(
                "memory {} KiB (allowed {min}..={MAX_KDF_MEMORY_KIB} KiB)",
                self.memory_kib
            ));
        }
        Ok(())
    }

    /// Derives a 256-bit wrapping key from a password (CPU- and memory-heavy by design: call it
    /// off async threads).
    fn derive(&self, password: &Password, salt: &[u8]) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        self.validate()?;
        let params =
            argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
                .map_err(|e| CryptoError::KdfParams {
                    reason: e.to_string(),
                })?;
        let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = Zeroizing::new([0u8; 32]);
        kdf.hash_password_into(password.as_bytes(), salt, &mut out[..])
            .map_err(|e| CryptoError::KdfParams {
                reason: e.to_string(),
            })?;
        Ok(out)
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

fn fill_random(out: &mut [u8]) -> Result<(), CryptoError> {
    SystemRandom::new()
        .fill(out)
        .map_err(|_| CryptoError::Random)
}

/// HKDF output length for [`hkdf::Prk::expand`].
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The working keys derived from a [`MasterKey`]: what sealing, opening and naming use.
pub struct RepoKeys {
    master: MasterKey,
    data: hkdf::Prk,
    name: Zeroizing<[u8; 32]>,
    id: String,
}

impl fmt::Debug for RepoKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RepoKeys")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn derive_32(master: &[u8; 32], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, master);
    let mut out = Zeroizing::new([0u8; 32]);
    // Expanding 32 bytes from SHA-256 cannot fail (the limit is 255 * 32).
    if let Ok(okm) = prk.expand(&[info], Len(32)) {
        let _ = okm.fill(&mut out[..]);
    }
    out
}

impl RepoKeys {
    /// Derives the working keys of a master key.
    pub fn derive(master: &MasterKey) -> Self {
        let data = derive_32(&master.0, b"cbt data key v1");
        let name = derive_32(&master.0, b"cbt chunk name key v1");
        let id = derive_32(&master.0, b"cbt key id v1");
        let mut hex = String::with_capacity(32);
        for b in &id[..16] {
            hex.push_str(&format!("{b:02x}"));
        }
        RepoKeys {
            data: hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &data[..]),
            name,
            id: hex,
            master: master.clone(),
        }
    }

    /// The key id recorded in the repository config (derived, reveals nothing of the key).
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// The master key these were derived from.
    pub fn master(&self) -> &MasterKey {
        &self.master
    }

    /// The stored name of a chunk whose raw bytes have the plain BLAKE3 hash `plain`.
    pub fn chunk_name(&self, plain: &ChunkHash) -> ChunkHash {
        ChunkHash(*blake3::keyed_hash(&self.name, &plain.0).as_bytes())
    }

    fn object_key(&self, kind: ObjectKind, salt: &[u8]) -> Result<LessSafeKey, SealError> {
        let kind_byte = [kind as u8];
        let info: [&[u8]; 3] = [b"cbt object v1", &kind_byte, salt];
        let okm = self
            .data
            .expand(&info, &AES_256_GCM)
            .map_err(|_| SealError::Authentication)?;
        Ok(LessSafeKey::new(UnboundKey::from(okm)))
    }

    /// Seals `plain` as the object `object_key` of `kind` (format in the module docs).
    ///
    /// # Errors
    /// [`CryptoError::Random`] if the system RNG fails.
    pub fn seal(
        &self,
        kind: ObjectKind,
        object_key: &str,
        plain: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::with_capacity(plain.len() + SEALED_OVERHEAD);
        out.extend_from_slice(&SEALED_MAGIC);
        out.push(SEALED_VERSION);
        out.push(kind as u8);
        out.extend_from_slice(&[0, 0]);
        out.resize(SEALED_HEADER_LEN, 0);
        fill_random(&mut out[8..SEALED_HEADER_LEN])?;
        let key = self
            .object_key(kind, &out[8..8 + SALT_LEN])
            .map_err(|_| CryptoError::Random)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&out[8 + SALT_LEN..SEALED_HEADER_LEN]);
        let aad = aad(&out[..SEALED_HEADER_LEN], object_key);
        out.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut out[SEALED_HEADER_LEN..],
            )
            // Only for inputs beyond GCM's 64 GiB message limit, far above any object.
            .map_err(|_| CryptoError::Random)?;
        out.extend_from_slice(tag.as_ref());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Opens a sealed object stored at `object_key`, returning its plain encoding.
    ///
    /// # Errors
    /// A [`SealError`] naming the first check that failed.
    pub fn open(
        &self,
        kind: ObjectKind,
        object_key: &str,
        sealed: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let mut buf = sealed.to_vec();
        let plain = self.open_in_place(kind, object_key, &mut buf)?;
        buf.truncate(plain.end);
        buf.drain(..plain.start);
        Ok(buf)
    }

    /// Opens a sealed object in its own buffer (no copy): returns where in `sealed` the plain
    /// encoding now is. On error the buffer's contents are unspecified.
    ///
    /// # Errors
    /// A [`SealError`] naming the first check that failed.
    pub fn open_in_place(
        &self,
        kind: ObjectKind,
        object_key: &str,
        sealed: &mut [u8],
    ) -> Result<std::ops::Range<usize>, SealError> {
        check_envelope(kind, sealed)?;
        let key = self.object_key(kind, &sealed[8..8 + SALT_LEN])?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[8 + SALT_LEN..SEALED_HEADER_LEN]);
        let aad = aad(&sealed[..SEALED_HEADER_LEN], object_key);
        let end = sealed.len() - 4;
        let n = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut sealed[SEALED_HEADER_LEN..end],
            )
            .map_err(|_| SealError::Authentication)?
            .len();
        Ok(SEALED_HEADER_LEN..SEALED_HEADER_LEN + n)
    }
}

fn aad(header: &[u8], object_key: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(header.len() + object_key.len());
    a.extend_from_slice(header);
    a.extend_from_slice(object_key.as_bytes());
    a
}

/// Checks a sealed object's framing and stored-bytes checksum without any key (what `verify`
/// can do for every object).
///
/// # Errors
/// A [`SealError`] other than [`SealError::Authentication`].
pub fn check_envelope(kind: ObjectKind, sealed: &[u8]) -> Result<(), SealError> {
    if sealed.len() < SEALED_OVERHEAD {
        return Err(SealError::TooShort {
            actual: sealed.len() as u64,
            min: SEALED_OVERHEAD as u64,
        });
    }
    if sealed[..4] != SEALED_MAGIC {
        return Err(SealError::Magic);
    }
    if sealed[4] != SEALED_VERSION {
        return Err(SealError::Version(sealed[4]));
    }
    if sealed[5] != kind as u8 {
        return Err(SealError::Kind {
            expected: kind as u8,
            found: sealed[5],
        });
    }
    let split = sealed.len() - 4;
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&sealed[split..]);
    let stored = u32::from_le_bytes(stored);
    let computed = crc32c::crc32c(&sealed[..split]);
    if stored != computed {
        return Err(SealError::Crc { stored, computed });
    }
    Ok(())
}

/// One key slot as stored at `keys/<id>`: the master key wrapped under a password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySlot {
    /// Always `cbt-key`.
    pub format: String,
    /// Slot format version (1).
    pub version: u32,
    /// The slot id (also its object name).
    pub id: String,
    /// When the slot was added.
    pub created_unix_ms: cbt_core::Timestamp,
    /// Always `argon2id` (version 0x13).
    pub kdf: String,
    /// Argon2id parameters.
    pub params: KdfParams,
    /// Argon2 salt (hex, 32 bytes).
    pub salt: String,
    /// AES-256-GCM nonce || ciphertext || tag of the master key (hex).
    pub wrapped_key: String,
}

/// Slot format name.
pub const KEY_SLOT_FORMAT: &str = "cbt-key";
const KDF_NAME: &str = "argon2id";
const WRAPPED_LEN: usize = NONCE_LEN + 32 + TAG_LEN;

/// Why a key slot could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// Not a well-formed slot, or parameters out of bounds: the slot is damaged or forged.
    #[error("{0}")]
    Invalid(String),
    /// The password does not open it (or its wrapped key was altered).
    #[error("the password does not open this key slot")]
    WrongPassword,
}

fn slot_aad(repo_id: &str, slot_id: &str) -> Vec<u8> {
    format!("cbt key slot v1\0{repo_id}\0{slot_id}").into_bytes()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str, len: usize) -> Option<Vec<u8>> {
    if s.len() != 2 * len || !s.is_ascii() {
        return None;
    }
    (0..len)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

impl KeySlot {
    /// Wraps `master` under `password` as slot `id` of repository `repo_id` (CPU- and
    /// memory-heavy: call it off async threads).
    ///
    /// # Errors
    /// [`CryptoError::KdfParams`] for parameters out of bounds; [`CryptoError::Random`].
    pub fn wrap(
        master: &MasterKey,
        password: &Password,
        params: KdfParams,
        repo_id: &str,
        id: &str,
        created: cbt_core::Timestamp,
    ) -> Result<Self, CryptoError> {
        let mut salt = [0u8; 32];
        fill_random(&mut salt)?;
        let kek = params.derive(password, &salt)?;
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &kek[..]).map_err(|_| CryptoError::Random)?,
        );
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let mut buf = Zeroizing::new(master.0.to_vec());
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(slot_aad(repo_id, id)),
                &mut buf[..],
            )
            .map_err(|_| CryptoError::Random)?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&buf);
        wrapped.extend_from_slice(tag.as_ref());
        Ok(KeySlot {
            format: KEY_SLOT_FORMAT.into(),
            version: 1,
            id: id.into(),
            created_unix_ms: created,
            kdf: KDF_NAME.into(),
            params,
            salt: to_hex(&salt),
            wrapped_key: to_hex(&wrapped),
        })
    }

    /// Checks everything about the slot that needs no password: format, sizes and KDF bounds.
    ///
    /// # Errors
    /// [`SlotError::Invalid`] naming what is wrong.
    pub fn validate(&self) -> Result<(), SlotError> {
        let bad = |s: String| Err(SlotError::Invalid(s));
        if self.format != KEY_SLOT_FORMAT {
            return bad(format!("unknown format {:?}", self.format));
        }
        if self.version != 1 {
            return bad(format!(
                "key slot version {} is not supported (this build reads 1)",
                self.version
            ));
        }
        if self.kdf != KDF_NAME {
            return bad(format!("unknown key derivation {:?}", self.kdf));
        }
        self.params
            .validate()
            .map_err(|e| SlotError::Invalid(e.to_string()))?;
        if from_hex(&self.salt, 32).is_none() {
            return bad("salt is not 32 bytes of hex".into());
        }
        if from_hex(&self.wrapped_key, WRAPPED_LEN).is_none() {
            return bad(format!("wrapped key is not {WRAPPED_LEN} bytes of hex"));
        }
        Ok(())
    }

    /// Unwraps the master key with `password` (CPU- and memory-heavy: call it off async
    /// threads). The slot is validated first, so a forged slot costs at most the bounded KDF.
    ///
    /// # Errors
    /// [`SlotError::Invalid`] for a damaged or forged slot; [`SlotError::WrongPassword`].
    pub fn unwrap_key(&self, password: &Password, repo_id: &str) -> Result<MasterKey, SlotError> {
        self.validate()?;
        let invalid = |s: &str| SlotError::Invalid(s.to_string());
        let salt = from_hex(&self.salt, 32).ok_or_else(|| invalid("bad salt"))?;
        let mut wrapped =
            from_hex(&self.wrapped_key, WRAPPED_LEN).ok_or_else(|| invalid("bad wrapped key"))?;
        let kek = self
            .params
            .derive(password, &salt)
            .map_err(|e| SlotError::Invalid(e.to_string()))?;
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &kek[..]).map_err(|_| invalid("bad key"))?,
        );
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&wrapped[..NONCE_LEN]);
        let opened = key.open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(slot_aad(repo_id, &self.id)),
            &mut wrapped[NONCE_LEN..],
        );
        let result = match opened {
            Ok(plain) if plain.len() == 32 => {
                let mut k = [0u8; 32];
                k.copy_from_slice(plain);
                let master = MasterKey::from_bytes(k);
                k.zeroize();
                Ok(master)
            }
            _ => Err(SlotError::WrongPassword),
        };
        wrapped.zeroize();
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    #[test]
    fn seal_round_trip_and_every_alteration_fails() {
        let keys = RepoKeys::derive(&MasterKey::generate().unwrap());
        let plain = b"some plain object".repeat(10);
        let sealed = keys.seal(ObjectKind::Chunk, "chunks/ab/x", &plain).unwrap();
        assert_eq!(sealed.len(), plain.len() + SEALED_OVERHEAD);
        assert_eq!(
            keys.open(ObjectKind::Chunk, "chunks/ab/x", &sealed)
                .unwrap(),
            plain
        );
        // Two seals of the same bytes differ (fresh salt and nonce).
        assert_ne!(
            sealed,
            keys.seal(ObjectKind::Chunk, "chunks/ab/x", &plain).unwrap()
        );
        assert_eq!(
            keys.open(ObjectKind::Chunk, "chunks/ab/y", &sealed),
            Err(SealError::Authentication)
        );
        assert!(matches!(
            keys.open(ObjectKind::Manifest, "chunks/ab/x", &sealed),
            Err(SealError::Kind { .. })
        ));
        let other = RepoKeys::derive(&MasterKey::generate().unwrap());
        assert_eq!(
            other.open(ObjectKind::Chunk, "chunks/ab/x", &sealed),
            Err(SealError::Authentication)
        );
        for pos in [0, 4, 5, 9, 40, 50, sealed.len() - 10, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[pos] ^= 1;
            assert!(keys.open(ObjectKind::Chunk, "chunks/ab/x", &bad).is_err());
            // With the checksum recomputed (a deliberate edit), authentication catches it.
            let n = bad.len() - 4;
            let crc = crc32c::crc32c(&bad[..n]);
            bad[n..].copy_from_slice(&crc.to_le_bytes());
            // (Flips in the trailer itself are undone by recomputing it.)
            if pos >= 8 && pos < n {
                assert_eq!(
                    keys.open(ObjectKind::Chunk, "chunks/ab/x", &bad),
                    Err(SealError::Authentication),
                    "flip at {pos}"
                );
            }
        }
        assert!(matches!(
            keys.open(ObjectKind::Chunk, "k", &sealed[..10]),
            Err(SealError::TooShort { .. })
        ));
    }

    #[test]
    fn chunk_names_are_keyed() {
        let a = RepoKeys::derive(&MasterKey::generate().unwrap());
        let b = RepoKeys::derive(&MasterKey::generate().unwrap());
        let h = crate::chunk::hash_raw(b"data");
        assert_eq!(a.chunk_name(&h), a.chunk_name(&h));
        assert_ne!(a.chunk_name(&h), h);
        assert_ne!(a.chunk_name(&h), b.chunk_name(&h));
        assert_ne!(a.key_id(), b.key_id());
    }

    #[test]
    fn slots_wrap_and_refuse() {
        let master = MasterKey::generate().unwrap();
        let pw = Password::new("correct horse").unwrap();
        let slot =
            KeySlot::wrap(&master, &pw, FAST, "repo1", "slot1", cbt_core::Timestamp(0)).unwrap();
        let back = slot.unwrap_key(&pw, "repo1").unwrap();
        assert_eq!(*back.to_bytes(), *master.to_bytes());
        let wrong = Password::new("battery staple").unwrap();
        assert_eq!(
            slot.unwrap_key(&wrong, "repo1").unwrap_err(),
            SlotError::WrongPassword
        );
        // Moved to another repository or renamed: refused.
        assert_eq!(
            slot.unwrap_key(&pw, "repo2").unwrap_err(),
            SlotError::WrongPassword
        );
        let mut renamed = slot.clone();
        renamed.id = "slot2".into();
        assert_eq!(
            renamed.unwrap_key(&pw, "repo1").unwrap_err(),
            SlotError::WrongPassword
        );
        // Hostile parameters are refused before any memory is allocated.
        for params in [
            KdfParams {
                memory_kib: u32::MAX,
                ..FAST
            },
            KdfParams {
                iterations: 1_000_000,
                ..FAST
            },
            KdfParams {
                parallelism: 0,
                ..FAST
            },
        ] {
            let mut hostile = slot.clone();
            hostile.params = params;
            assert!(matches!(
                hostile.unwrap_key(&pw, "repo1"),
                Err(SlotError::Invalid(_))
            ));
        }
        let mut short = slot.clone();
        short.wrapped_key.pop();
        assert!(matches!(
            short.unwrap_key(&pw, "repo1"),
            Err(SlotError::Invalid(_))
        ));
        assert!(Password::new("").is_err());
        assert_eq!(format!("{pw:?}"), "Password(<redacted>)");
        assert_eq!(format!("{master:?}"), "MasterKey(<redacted>)");
    }

    #[test]
    fn password_files_lose_one_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "secret\r\n").unwrap();
        assert_eq!(Password::from_file(&p).unwrap().as_bytes(), b"secret");
        std::fs::write(&p, "secret\n\n").unwrap();
        assert_eq!(Password::from_file(&p).unwrap().as_bytes(), b"secret\n");
        std::fs::write(&p, vec![b'x'; MAX_PASSWORD_LEN + 10]).unwrap();
        assert!(Password::from_file(&p).is_err());
        assert!(matches!(
            Password::from_file(&dir.path().join("missing")),
            Err(CryptoError::PasswordFile { .. })
        ));
    }
}
