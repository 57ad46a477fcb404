//! Encryption at rest: the repository key, password and key-file key slots, and the
//! sealed-object envelope.
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
//! A slot can instead be opened by a [`KeyFile`]: a file holding 256 random bits. Its wrapping
//! key is `HKDF-SHA256(salt = the slot's random salt, secret)`, a fast derivation, since a
//! random secret needs no stretching against guessing. The slot records the key file's id (a
//! hash of its secret, revealing nothing of it), so a listing tells which file opens which
//! slot and a wrong key file is named as such without any slot being tried.
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

use crate::chunk::Received;

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
/// Largest key file accepted, in bytes (ours are about 300).
pub const MAX_KEY_FILE_LEN: u64 = 4096;
/// First word of the line of a key file that holds the secret.
pub const KEY_FILE_MAGIC: &str = "cbt-key-file";

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
    /// The crc32c the store recorded for the object (left for the reader to compare, in the
    /// same pass as the envelope's own) does not match the bytes read.
    #[error(
        "the store's checksum of the object does not match: stored {stored:#010x}, computed {computed:#010x}"
    )]
    StoredCrc {
        /// Value the store recorded.
        stored: u32,
        /// Computed over the object as read.
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

/// A key file's secret: 256 random bits that open the key slots made for it. Zeroed when
/// dropped; never printed.
///
/// On disk it is text: comment lines (`#`) and one line `cbt-key-file v1 <64 hex digits>`.
#[derive(Clone)]
pub struct KeyFile {
    secret: Zeroizing<[u8; 32]>,
    id: String,
}

impl KeyFile {
    /// A new random key file secret from the system RNG.
    ///
    /// # Errors
    /// [`CryptoError::Random`] if the system RNG fails.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = Zeroizing::new([0u8; 32]);
        fill_random(&mut k[..])?;
        Ok(Self::from_secret(k))
    }

    fn from_secret(secret: Zeroizing<[u8; 32]>) -> Self {
        let id = derive_32(&secret, b"cbt key file id v1");
        KeyFile {
            id: to_hex(&id[..8]),
            secret,
        }
    }

    /// The key file's id: 16 hex digits derived from the secret (they reveal nothing of it),
    /// recorded in the slots it opens and printed in the file's comment.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The file's contents.
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "# cbt repository key file, id {id}. It opens every repository that has a key slot\n\
             # for it: keep it secret, and keep a copy (without it or a password the data\n\
             # cannot be read).\n\
             {KEY_FILE_MAGIC} v1 {}\n",
            Zeroizing::new(to_hex(&self.secret[..])).as_str(),
            id = self.id
        ))
    }

    /// Parses a key file's contents (at most [`MAX_KEY_FILE_LEN`] bytes).
    ///
    /// # Errors
    /// [`CryptoError::KeyFile`] (with an empty path) naming what is wrong.
    pub fn parse(text: &[u8]) -> Result<Self, CryptoError> {
        Self::parse_at(text, std::path::Path::new(""))
    }

    fn parse_at(text: &[u8], path: &std::path::Path) -> Result<Self, CryptoError> {
        let bad = |reason: &str| CryptoError::KeyFile {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if text.len() as u64 > MAX_KEY_FILE_LEN {
            return Err(bad(&format!(
                "larger than {MAX_KEY_FILE_LEN} bytes: not a key file"
            )));
        }
        let text = std::str::from_utf8(text).map_err(|_| bad("not text: not a key file"))?;
        let mut found = None;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if found.is_some() {
                return Err(bad("more than one key line"));
            }
            found = Some(line);
        }
        let line = found.ok_or_else(|| bad("no key line: not a key file"))?;
        let mut words = line.split_ascii_whitespace();
        if words.next() != Some(KEY_FILE_MAGIC) {
            return Err(bad("not a cbt key file"));
        }
        match words.next() {
            Some("v1") => {}
            Some(v) => {
                return Err(bad(&format!(
                    "key file version {:?} is not supported (this build reads v1); upgrade cbt",
                    v.chars().take(16).collect::<String>()
                )));
            }
            None => return Err(bad("the key line has no version")),
        }
        let hex = words
            .next()
            .ok_or_else(|| bad("the key line has no secret"))?;
        if words.next().is_some() {
            return Err(bad("unexpected words after the secret"));
        }
        let bytes = Zeroizing::new(
            from_hex(hex, 32).ok_or_else(|| bad("the secret is not 64 hex digits"))?,
        );
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&bytes);
        Ok(Self::from_secret(secret))
    }

    /// Reads a key file (bounded: a file larger than [`MAX_KEY_FILE_LEN`] is refused unread).
    ///
    /// # Errors
    /// [`CryptoError::KeyFile`] if it cannot be read or is not a key file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, CryptoError> {
        use std::io::Read;
        let failed = |reason: String| CryptoError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| failed(e.to_string()))?;
        let mut bytes = Zeroizing::new(Vec::new());
        file.take(MAX_KEY_FILE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| failed(e.to_string()))?;
        Self::parse_at(&bytes, path)
    }

    /// Writes the key file to a new file at `path`, readable by its owner only (mode 0600 on
    /// Unix), and syncs it.
    ///
    /// # Errors
    /// [`CryptoError::KeyFileExists`] if anything exists at `path` (never overwritten);
    /// [`CryptoError::KeyFileWrite`] for other failures (a partial file is removed).
    pub fn write_new(&self, path: &std::path::Path) -> Result<(), CryptoError> {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = match opts.open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CryptoError::KeyFileExists {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => {
                return Err(CryptoError::KeyFileWrite {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        };
        let written = file
            .write_all(self.to_text().as_bytes())
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(CryptoError::KeyFileWrite {
                path: path.to_path_buf(),
                reason: e.to_string(),
            });
        }
        Ok(())
    }

    /// The wrapping key of a slot with this salt.
    fn wrapping_key(&self, salt: &[u8]) -> Zeroizing<[u8; 32]> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&self.secret[..]);
        let mut out = Zeroizing::new([0u8; 32]);
        // Expanding 32 bytes from SHA-256 cannot fail (the limit is 255 * 32).
        if let Ok(okm) = prk.expand(&[b"cbt key file slot v1"], Len(32)) {
            let _ = okm.fill(&mut out[..]);
        }
        out
    }
}

impl fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyFile({}, <redacted>)", self.id)
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
    /// A key file cannot be read, or is not a key file.
    #[error("cannot use key file {}: {reason}", path.display())]
    KeyFile {
        /// The file (empty when parsed from memory).
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A new key file was not written because something exists at its path.
    #[error("{} already exists; a key file is never overwritten", path.display())]
    KeyFileExists {
        /// The path.
        path: std::path::PathBuf,
    },
    /// A new key file could not be written.
    #[error("cannot write key file {}: {reason}", path.display())]
    KeyFileWrite {
        /// The path.
        path: std::path::PathBuf,
        /// What failed.
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
        out.resize(SEALED_HEADER_LEN, 0);
        out.extend_from_slice(plain);
        self.seal_framed(kind, object_key, out)
    }

    /// Like [`RepoKeys::seal`], but in `plain`'s own buffer: it grows by the envelope and the
    /// bytes move up in place, so a freshly encoded multi-megabyte chunk costs no second
    /// allocation (whose pages would all be faulted in again).
    ///
    /// # Errors
    /// [`CryptoError::Random`] if the system RNG fails.
    pub fn seal_vec(
        &self,
        kind: ObjectKind,
        object_key: &str,
        mut plain: Vec<u8>,
    ) -> Result<Vec<u8>, CryptoError> {
        let n = plain.len();
        plain.reserve_exact(SEALED_OVERHEAD);
        plain.resize(n + SEALED_HEADER_LEN, 0);
        plain.copy_within(0..n, SEALED_HEADER_LEN);
        self.seal_framed(kind, object_key, plain)
    }

    /// Seals `out[SEALED_HEADER_LEN..]` in place: fills the header, encrypts, appends tag and
    /// crc.
    fn seal_framed(
        &self,
        kind: ObjectKind,
        object_key: &str,
        mut out: Vec<u8>,
    ) -> Result<Vec<u8>, CryptoError> {
        out[..4].copy_from_slice(&SEALED_MAGIC);
        out[4] = SEALED_VERSION;
        out[5] = kind as u8;
        out[6..8].fill(0);
        fill_random(&mut out[8..SEALED_HEADER_LEN])?;
        let key = self
            .object_key(kind, &out[8..8 + SALT_LEN])
            .map_err(|_| CryptoError::Random)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&out[8 + SALT_LEN..SEALED_HEADER_LEN]);
        let aad = aad(&out[..SEALED_HEADER_LEN], object_key);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut out[SEALED_HEADER_LEN..],
            )
            // Only for inputs beyond GCM's 64 GiB message limit, far above any object.
            .map_err(|_| CryptoError::Random)?;
        out.extend_from_slice(tag.as_ref());
        let crc = crate::crc::crc32c(&out);
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
        self.open_in_place_stored(kind, object_key, sealed, Received::default())
    }

    /// [`RepoKeys::open_in_place`], also comparing the crc32c the store recorded for the
    /// whole object when it left that comparison to the reader, in the envelope checksum's
    /// pass ([`SealError::StoredCrc`] if it differs); that pass is skipped when the store
    /// computed the crc32c of all but the envelope's trailer as the bytes arrived.
    ///
    /// # Errors
    /// As [`RepoKeys::open_in_place`].
    pub(crate) fn open_in_place_stored(
        &self,
        kind: ObjectKind,
        object_key: &str,
        sealed: &mut [u8],
        received: Received,
    ) -> Result<std::ops::Range<usize>, SealError> {
        check_envelope_stored(kind, sealed, received)?;
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
    check_envelope_stored(kind, sealed, Received::default())
}

/// [`check_envelope`], with the store's crc32c of the whole object compared first when the
/// store left it to us: it is the envelope's crc32c extended over the envelope's trailer.
fn check_envelope_stored(
    kind: ObjectKind,
    sealed: &[u8],
    received: Received,
) -> Result<(), SealError> {
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
    let computed = received
        .before_trailer
        .unwrap_or_else(|| crate::crc::crc32c(&sealed[..split]));
    if let Some(whole) = received.stored_crc {
        let computed = crc32c::crc32c_append(computed, &sealed[split..]);
        if whole != computed {
            return Err(SealError::StoredCrc {
                stored: whole,
                computed,
            });
        }
    }
    if stored != computed {
        return Err(SealError::Crc { stored, computed });
    }
    Ok(())
}

/// One key slot as stored at `keys/<id>`: the master key wrapped under a password or a key file.
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
    /// `argon2id` (version 0x13; a password slot) or `hkdf-sha256` (a key-file slot).
    pub kdf: String,
    /// Argon2id parameters (password slots only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<KdfParams>,
    /// Id of the key file that opens it (key-file slots only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file_id: Option<String>,
    /// KDF salt (hex, 32 bytes).
    pub salt: String,
    /// AES-256-GCM nonce || ciphertext || tag of the master key (hex).
    pub wrapped_key: String,
}

/// Slot format name.
pub const KEY_SLOT_FORMAT: &str = "cbt-key";
const KDF_ARGON2ID: &str = "argon2id";
const KDF_HKDF: &str = "hkdf-sha256";
const WRAPPED_LEN: usize = NONCE_LEN + 32 + TAG_LEN;

/// What opens a key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotKind {
    /// A password (Argon2id).
    Password,
    /// A key file (HKDF).
    KeyFile,
}

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
    /// The key file does not open it (or its wrapped key was altered).
    #[error("the key file does not open this key slot")]
    WrongKeyFile,
    /// The slot is of another kind than the secret tried (a password against a key-file slot).
    #[error("this key slot is opened by a {0:?}, not by what was given")]
    OtherKind(SlotKind),
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

/// Seals the master key under `kek`; returns nonce || ciphertext || tag.
fn wrap_master(
    master: &MasterKey,
    kek: &[u8; 32],
    repo_id: &str,
    id: &str,
) -> Result<Vec<u8>, CryptoError> {
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &kek[..]).map_err(|_| CryptoError::Random)?);
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
    Ok(wrapped)
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
        let wrapped = wrap_master(master, &kek, repo_id, id)?;
        Ok(KeySlot {
            format: KEY_SLOT_FORMAT.into(),
            version: 1,
            id: id.into(),
            created_unix_ms: created,
            kdf: KDF_ARGON2ID.into(),
            params: Some(params),
            key_file_id: None,
            salt: to_hex(&salt),
            wrapped_key: to_hex(&wrapped),
        })
    }

    /// Wraps `master` under `key_file` as slot `id` of repository `repo_id` (fast: HKDF).
    ///
    /// # Errors
    /// [`CryptoError::Random`].
    pub fn wrap_key_file(
        master: &MasterKey,
        key_file: &KeyFile,
        repo_id: &str,
        id: &str,
        created: cbt_core::Timestamp,
    ) -> Result<Self, CryptoError> {
        let mut salt = [0u8; 32];
        fill_random(&mut salt)?;
        let kek = key_file.wrapping_key(&salt);
        let wrapped = wrap_master(master, &kek, repo_id, id)?;
        Ok(KeySlot {
            format: KEY_SLOT_FORMAT.into(),
            version: 1,
            id: id.into(),
            created_unix_ms: created,
            kdf: KDF_HKDF.into(),
            params: None,
            key_file_id: Some(key_file.id().to_string()),
            salt: to_hex(&salt),
            wrapped_key: to_hex(&wrapped),
        })
    }

    /// What opens this slot (`None` for an unknown KDF).
    pub fn kind(&self) -> Option<SlotKind> {
        match self.kdf.as_str() {
            KDF_ARGON2ID => Some(SlotKind::Password),
            KDF_HKDF => Some(SlotKind::KeyFile),
            _ => None,
        }
    }

    /// Checks everything about the slot that needs no secret: format, sizes and KDF bounds.
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
        match (self.kind(), self.params, &self.key_file_id) {
            (Some(SlotKind::Password), Some(params), None) => params
                .validate()
                .map_err(|e| SlotError::Invalid(e.to_string()))?,
            (Some(SlotKind::Password), _, _) => {
                return bad("a password slot needs Argon2id parameters and no key file id".into());
            }
            (Some(SlotKind::KeyFile), None, Some(id)) => {
                if from_hex(id, 8).is_none() {
                    return bad("key file id is not 16 hex digits".into());
                }
            }
            (Some(SlotKind::KeyFile), _, _) => {
                return bad(
                    "a key-file slot needs a key file id and no Argon2id parameters".into(),
                );
            }
            (None, _, _) => {
                return bad(format!(
                    "unknown key derivation {:?}",
                    self.kdf.chars().take(32).collect::<String>()
                ));
            }
        }
        if from_hex(&self.salt, 32).is_none() {
            return bad("salt is not 32 bytes of hex".into());
        }
        if from_hex(&self.wrapped_key, WRAPPED_LEN).is_none() {
            return bad(format!("wrapped key is not {WRAPPED_LEN} bytes of hex"));
        }
        Ok(())
    }

    /// Opens the wrapped key with `kek`; `None` when authentication fails.
    fn open_wrapped(&self, kek: &[u8; 32], repo_id: &str) -> Result<Option<MasterKey>, SlotError> {
        let invalid = |s: &str| SlotError::Invalid(s.to_string());
        let mut wrapped =
            from_hex(&self.wrapped_key, WRAPPED_LEN).ok_or_else(|| invalid("bad wrapped key"))?;
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
                Some(master)
            }
            _ => None,
        };
        wrapped.zeroize();
        Ok(result)
    }

    /// Unwraps the master key with `password` (CPU- and memory-heavy: call it off async
    /// threads). The slot is validated first, so a forged slot costs at most the bounded KDF.
    ///
    /// # Errors
    /// [`SlotError::Invalid`] for a damaged or forged slot; [`SlotError::OtherKind`] for a
    /// key-file slot; [`SlotError::WrongPassword`].
    pub fn unwrap_key(&self, password: &Password, repo_id: &str) -> Result<MasterKey, SlotError> {
        self.validate()?;
        let Some(params) = self
            .params
            .filter(|_| self.kind() == Some(SlotKind::Password))
        else {
            return Err(SlotError::OtherKind(SlotKind::KeyFile));
        };
        let salt = from_hex(&self.salt, 32).ok_or_else(|| SlotError::Invalid("bad salt".into()))?;
        let kek = params
            .derive(password, &salt)
            .map_err(|e| SlotError::Invalid(e.to_string()))?;
        self.open_wrapped(&kek, repo_id)?
            .ok_or(SlotError::WrongPassword)
    }

    /// Unwraps the master key with `key_file` (fast).
    ///
    /// # Errors
    /// [`SlotError::Invalid`] for a damaged or forged slot; [`SlotError::OtherKind`] for a
    /// password slot; [`SlotError::WrongKeyFile`] for a slot of another key file, or whose
    /// wrapped key was altered.
    pub fn unwrap_with_key_file(
        &self,
        key_file: &KeyFile,
        repo_id: &str,
    ) -> Result<MasterKey, SlotError> {
        self.validate()?;
        if self.kind() != Some(SlotKind::KeyFile) {
            return Err(SlotError::OtherKind(SlotKind::Password));
        }
        if self.key_file_id.as_deref() != Some(key_file.id()) {
            return Err(SlotError::WrongKeyFile);
        }
        let salt = from_hex(&self.salt, 32).ok_or_else(|| SlotError::Invalid("bad salt".into()))?;
        let kek = key_file.wrapping_key(&salt);
        self.open_wrapped(&kek, repo_id)?
            .ok_or(SlotError::WrongKeyFile)
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

    /// The crc32c of all but the envelope's trailer, computed as the bytes arrived, stands in
    /// for the opener's own pass: intact envelopes open, and bytes damaged on the way (the
    /// crc computed over the damaged bytes) are refused as the store's damage or, without a
    /// stored crc32c, as the envelope's.
    #[test]
    fn a_crc_computed_on_arrival_checks_what_the_openers_own_pass_checks() {
        let keys = RepoKeys::derive(&MasterKey::generate().unwrap());
        let plain = b"sealed on arrival ".repeat(5000);
        let sealed = keys.seal(ObjectKind::Chunk, "chunks/ab/y", &plain).unwrap();
        let split = sealed.len() - 4;
        let whole = crc32c::crc32c(&sealed);
        let received = |bytes: &[u8], stored| Received {
            stored_crc: stored,
            before_trailer: Some(crc32c::crc32c(&bytes[..split])),
        };
        let mut ok = sealed.clone();
        let r = keys
            .open_in_place_stored(
                ObjectKind::Chunk,
                "chunks/ab/y",
                &mut ok,
                received(&sealed, Some(whole)),
            )
            .unwrap();
        assert!(ok[r] == plain[..]);
        let mut bad = sealed.clone();
        bad[split / 2] ^= 1;
        let on_arrival = received(&bad, Some(whole));
        assert!(matches!(
            keys.open_in_place_stored(
                ObjectKind::Chunk,
                "chunks/ab/y",
                &mut bad.clone(),
                on_arrival
            ),
            Err(SealError::StoredCrc { .. })
        ));
        let on_arrival = received(&bad, None);
        assert!(matches!(
            keys.open_in_place_stored(ObjectKind::Chunk, "chunks/ab/y", &mut bad, on_arrival),
            Err(SealError::Crc { .. })
        ));
    }

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
        let in_place = keys
            .seal_vec(ObjectKind::Chunk, "chunks/ab/x", plain.clone())
            .unwrap();
        assert_eq!(in_place.len(), sealed.len());
        assert_eq!(
            keys.open(ObjectKind::Chunk, "chunks/ab/x", &in_place)
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
            hostile.params = Some(params);
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
    fn key_files_round_trip_and_refuse_what_is_not_one() {
        let master = MasterKey::generate().unwrap();
        let kf = KeyFile::generate().unwrap();
        assert_eq!(kf.id().len(), 16);
        assert_eq!(
            format!("{kf:?}"),
            format!("KeyFile({}, <redacted>)", kf.id())
        );
        let text = kf.to_text();
        assert!(text.contains(kf.id()));
        let back = KeyFile::parse(text.as_bytes()).unwrap();
        assert_eq!(back.id(), kf.id());
        let slot =
            KeySlot::wrap_key_file(&master, &kf, "repo1", "s1", cbt_core::Timestamp(0)).unwrap();
        slot.validate().unwrap();
        assert_eq!(slot.kind(), Some(SlotKind::KeyFile));
        assert_eq!(
            *slot
                .unwrap_with_key_file(&back, "repo1")
                .unwrap()
                .to_bytes(),
            *master.to_bytes()
        );
        // Another key file, another repository, a password: refused, each by name.
        let other = KeyFile::generate().unwrap();
        assert_eq!(
            slot.unwrap_with_key_file(&other, "repo1").unwrap_err(),
            SlotError::WrongKeyFile
        );
        assert_eq!(
            slot.unwrap_with_key_file(&kf, "repo2").unwrap_err(),
            SlotError::WrongKeyFile
        );
        let pw = Password::new("pw").unwrap();
        assert_eq!(
            slot.unwrap_key(&pw, "repo1").unwrap_err(),
            SlotError::OtherKind(SlotKind::KeyFile)
        );
        let pw_slot =
            KeySlot::wrap(&master, &pw, FAST, "repo1", "s2", cbt_core::Timestamp(0)).unwrap();
        assert_eq!(
            pw_slot.unwrap_with_key_file(&kf, "repo1").unwrap_err(),
            SlotError::OtherKind(SlotKind::Password)
        );
        // A slot claiming another key file's id, or mixing kinds, is refused before any use.
        let mut forged = slot.clone();
        forged.key_file_id = Some(other.id().to_string());
        assert_eq!(
            forged.unwrap_with_key_file(&other, "repo1").unwrap_err(),
            SlotError::WrongKeyFile
        );
        let mut mixed = slot.clone();
        mixed.params = Some(FAST);
        assert!(matches!(mixed.validate(), Err(SlotError::Invalid(_))));
        // Serialized slots keep their shape: password slots have params, key-file slots not.
        let json = serde_json::to_value(&slot).unwrap();
        assert!(json.get("params").is_none());
        assert_eq!(json["kdf"], "hkdf-sha256");
        let json = serde_json::to_value(&pw_slot).unwrap();
        assert!(json.get("key_file_id").is_none());

        let hex = "ab".repeat(32);
        for (bad, why) in [
            (String::new(), "no key line"),
            ("# only a comment\n".into(), "no key line"),
            (format!("cbt-key-file v2 {hex}\n"), "version"),
            (format!("other-file v1 {hex}\n"), "not a cbt key file"),
            ("cbt-key-file v1 abcd\n".into(), "64 hex"),
            (format!("cbt-key-file v1 {hex} extra\n"), "unexpected"),
            (
                format!("cbt-key-file v1 {hex}\ncbt-key-file v1 {hex}\n"),
                "more than one",
            ),
            ("x".repeat(MAX_KEY_FILE_LEN as usize + 1), "larger than"),
        ] {
            match KeyFile::parse(bad.as_bytes()) {
                Err(CryptoError::KeyFile { reason, .. }) => {
                    assert!(reason.contains(why), "{reason} for {bad:?}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(matches!(
            KeyFile::parse(&[0xff, 0xfe]),
            Err(CryptoError::KeyFile { .. })
        ));
        // Comments and blank lines around the key line are fine.
        let ok = format!("\n# note\n  cbt-key-file v1 {hex}  \n\n");
        KeyFile::parse(ok.as_bytes()).unwrap();
    }

    #[test]
    fn key_files_are_written_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repo.key");
        let kf = KeyFile::generate().unwrap();
        kf.write_new(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(KeyFile::from_file(&path).unwrap().id(), kf.id());
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(
            KeyFile::generate().unwrap().write_new(&path),
            Err(CryptoError::KeyFileExists { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(matches!(
            kf.write_new(&dir.path().join("no/such/dir/k")),
            Err(CryptoError::KeyFileWrite { .. })
        ));
        // A huge file is refused without being read whole.
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'#'; 1 << 20]).unwrap();
        assert!(matches!(
            KeyFile::from_file(&big),
            Err(CryptoError::KeyFile { reason, .. }) if reason.contains("larger than")
        ));
        assert!(matches!(
            KeyFile::from_file(&dir.path().join("missing")),
            Err(CryptoError::KeyFile { .. })
        ));
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
