//! Sealing of the links inside queued email jobs (ARCHITECTURE.md "Tokens",
//! `usher.notification.v1.EmailJob.sealed_link`): a link carries a token, and
//! no token may be readable in the queue, so the producer (identity,
//! invitation) seals it with a key that only it and the notification service
//! hold.
//!
//! # Layout
//!
//! Exactly as `email_job.proto` documents it: XChaCha20-Poly1305 (the
//! `chacha20poly1305` crate of RustCrypto), a 24-byte random nonce from the OS
//! CSPRNG, then the ciphertext, then the 16-byte tag:
//!
//! ```text
//! sealed = nonce (24) ‖ ciphertext (len(plaintext)) ‖ tag (16)
//! associated data = the UTF-8 job id
//! ```
//!
//! The associated data binds a sealed link to its job: copied into another
//! job, it does not open. The 192-bit nonce makes random nonces safe for any
//! number of seals under one key. `EmailJob.seal_key_id` carries
//! [`Sealer::key_id`] so keys can be rotated: the notification service picks
//! the key by that id.
//!
//! # Why this crate
//!
//! `chacha20poly1305` is the RustCrypto implementation (audited, maintained,
//! pure Rust, constant time). Version 0.10 shares the `cipher` 0.4 generation
//! already in the tree, so no second copy of the trait crates is built.

use std::fmt;

use base64::{Engine, engine::general_purpose::STANDARD};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use rand::{TryRngCore, rngs::OsRng};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Environment, Secret};

/// The configuration section of [`SealConfig`] in each service that holds it.
pub const SECTION: &str = "seal";
/// Length of the key: 256 bits.
pub const KEY_BYTES: usize = 32;
/// Length of the random nonce that starts a sealed value.
pub const NONCE_BYTES: usize = 24;
/// Length of the Poly1305 tag that ends a sealed value.
pub const TAG_BYTES: usize = 16;
/// Longest plaintext sealed or opened: a link is far shorter; the bound keeps
/// a malformed job from costing anything.
pub const MAX_PLAINTEXT_BYTES: usize = 8 * 1024;
/// Longest key id.
pub const MAX_KEY_ID_CHARS: usize = 64;

/// The key used when none is configured. It is public, so
/// `environment = "production"` refuses it.
const DEVELOPMENT_KEY: &[u8; KEY_BYTES] = b"usher-insecure-development-seal!";
/// The key id of the development key.
const DEVELOPMENT_KEY_ID: &str = "dev";

/// The sealing key (section `seal`), the same in the producers and the
/// notification service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SealConfig {
    /// 32 bytes in base64; empty means the public development key (refused in
    /// production).
    pub key: Secret,
    /// Names the key in each job (`EmailJob.seal_key_id`), for rotation: 1 to
    /// 64 characters of `[A-Za-z0-9._-]`.
    pub key_id: String,
    /// A second key for a rotation (32 bytes in base64): it opens the links
    /// of jobs naming [`Self::previous_key_id`] and never seals (read by the
    /// notification service; `docs/notification.md`, "The seal format").
    /// Empty for none.
    pub previous_key: Secret,
    /// The id of [`Self::previous_key`]; empty when it is.
    pub previous_key_id: String,
}

impl Default for SealConfig {
    fn default() -> Self {
        Self {
            key: Secret::default(),
            key_id: DEVELOPMENT_KEY_ID.into(),
            previous_key: Secret::default(),
            previous_key_id: String::new(),
        }
    }
}

impl SealConfig {
    /// Checks the key and its id, refusing the development key in production.
    pub fn validate_for(&self, environment: Environment) -> Result<(), ConfigError> {
        let key = self.key_bytes()?;
        if environment == Environment::Production && key == *DEVELOPMENT_KEY {
            return Err(ConfigError::invalid(
                format!("{SECTION}.key"),
                "required in production (the development key is public)",
            ));
        }
        check_key_id("key_id", &self.key_id)?;
        if self.previous_key.is_empty() != self.previous_key_id.is_empty() {
            return Err(ConfigError::invalid(
                format!("{SECTION}.previous_key_id"),
                "previous_key and previous_key_id go together",
            ));
        }
        if self.previous()?.is_some() {
            check_key_id("previous_key_id", &self.previous_key_id)?;
            if self.previous_key_id == self.key_id {
                return Err(ConfigError::invalid(
                    format!("{SECTION}.previous_key_id"),
                    "must differ from key_id",
                ));
            }
        }
        Ok(())
    }

    /// The previous key, when one is configured.
    fn previous(&self) -> Result<Option<[u8; KEY_BYTES]>, ConfigError> {
        if self.previous_key.is_empty() {
            return Ok(None);
        }
        decode_key("previous_key", &self.previous_key).map(Some)
    }

    /// The key: the configured one, or the development key when empty.
    fn key_bytes(&self) -> Result<[u8; KEY_BYTES], ConfigError> {
        if self.key.is_empty() {
            return Ok(*DEVELOPMENT_KEY);
        }
        decode_key("key", &self.key)
    }
}

/// A key from standard base64 of its 32 bytes, for the setting `name`.
fn decode_key(name: &str, key: &Secret) -> Result<[u8; KEY_BYTES], ConfigError> {
    let field = || format!("{SECTION}.{name}");
    let decoded = STANDARD
        .decode(key.expose().trim())
        .map_err(|_| ConfigError::invalid(field(), "must be base64"))?;
    <[u8; KEY_BYTES]>::try_from(decoded.as_slice())
        .map_err(|_| ConfigError::invalid(field(), format!("must be {KEY_BYTES} bytes")))
}

/// Checks a key id (the setting `name`).
fn check_key_id(name: &str, id: &str) -> Result<(), ConfigError> {
    let ok = (1..=MAX_KEY_ID_CHARS).contains(&id.chars().count())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        return Ok(());
    }
    Err(ConfigError::invalid(
        format!("{SECTION}.{name}"),
        format!("must be 1 to {MAX_KEY_ID_CHARS} characters of A-Z, a-z, 0-9, '.', '_' and '-'"),
    ))
}

/// Why a value could not be sealed or opened. Messages never quote the
/// plaintext or the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// Shorter than a nonce and a tag, or longer than any sealed link.
    #[error("sealed value malformed")]
    Malformed,
    /// The tag does not verify: another key, another job id, or altered bytes.
    #[error("sealed value not authentic")]
    NotAuthentic,
    /// The job names a key id this sealer does not hold.
    #[error("unknown seal key")]
    UnknownKey,
    /// It opened, but the plaintext is not UTF-8.
    #[error("sealed value is not text")]
    NotText,
    /// The plaintext is longer than [`MAX_PLAINTEXT_BYTES`].
    #[error("value too long to seal")]
    TooLong,
    /// The operating system's random number generator failed.
    #[error("os random number generator failed: {0}")]
    Entropy(String),
}

/// Seals and opens links with one key. Cheap to clone; `Debug` shows the key
/// id only.
#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
    key_id: String,
    /// The key being rotated out, with its id: opens, never seals.
    previous: Option<(String, XChaCha20Poly1305)>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &self.key_id)
            .field("previous_key_id", &self.previous.as_ref().map(|(id, _)| id))
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer with a 32-byte `key` named `key_id`.
    pub fn new(key: &[u8; KEY_BYTES], key_id: impl Into<String>) -> Self {
        Self {
            cipher: XChaCha20Poly1305::new(key.into()),
            key_id: key_id.into(),
            previous: None,
        }
    }

    /// The sealer of the configured key (the development key when empty),
    /// also opening with the previous key when one is configured.
    pub fn from_config(config: &SealConfig) -> Result<Self, ConfigError> {
        let mut sealer = Self::new(&config.key_bytes()?, config.key_id.clone());
        if let Some(previous) = config.previous()? {
            sealer.previous = Some((
                config.previous_key_id.clone(),
                XChaCha20Poly1305::new(&previous.into()),
            ));
        }
        Ok(sealer)
    }

    /// The key id to put in `EmailJob.seal_key_id` next to each sealed link.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Seals `plaintext` for the job `job_id`: nonce ‖ ciphertext ‖ tag.
    ///
    /// # Panics
    ///
    /// When the OS random number generator fails (as [`crate::tokens::Token::generate`]
    /// does: without entropy nothing may be sealed) or `plaintext` is longer
    /// than [`MAX_PLAINTEXT_BYTES`]. Use [`Sealer::try_seal`] to get the error
    /// instead.
    pub fn seal(&self, job_id: &str, plaintext: &str) -> Vec<u8> {
        match self.try_seal(job_id, plaintext) {
            Ok(sealed) => sealed,
            Err(error) => panic!("{error}"),
        }
    }

    /// As [`Sealer::seal`], returning the error.
    pub fn try_seal(&self, job_id: &str, plaintext: &str) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_BYTES];
        OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|error| SealError::Entropy(error.to_string()))?;
        self.seal_with_nonce(job_id, plaintext, nonce)
    }

    /// Seals with a given nonce: only the documented test vectors choose
    /// theirs; every real seal draws a random one.
    fn seal_with_nonce(
        &self,
        job_id: &str,
        plaintext: &str,
        nonce: [u8; NONCE_BYTES],
    ) -> Result<Vec<u8>, SealError> {
        if plaintext.len() > MAX_PLAINTEXT_BYTES {
            return Err(SealError::TooLong);
        }
        let ciphertext = self
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: job_id.as_bytes(),
                },
            )
            // Only an absurd length fails, and it was refused above.
            .map_err(|_| SealError::TooLong)?;
        let mut sealed = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        Ok(sealed)
    }

    /// Opens a link sealed for `job_id` under the key named `key_id`
    /// (`EmailJob.seal_key_id`): this sealer's key or, during a rotation,
    /// the previous one; [`SealError::UnknownKey`] for any other id.
    pub fn open_with_key_id(
        &self,
        key_id: &str,
        job_id: &str,
        sealed: &[u8],
    ) -> Result<String, SealError> {
        if key_id == self.key_id {
            return open_with(&self.cipher, job_id, sealed);
        }
        match &self.previous {
            Some((id, cipher)) if id == key_id => open_with(cipher, job_id, sealed),
            _ => Err(SealError::UnknownKey),
        }
    }

    /// Opens what [`Sealer::seal`] sealed for the same `job_id` under this key.
    pub fn open(&self, job_id: &str, sealed: &[u8]) -> Result<String, SealError> {
        open_with(&self.cipher, job_id, sealed)
    }
}

/// Opens `sealed` (nonce ‖ ciphertext ‖ tag) for `job_id` with `cipher`.
fn open_with(cipher: &XChaCha20Poly1305, job_id: &str, sealed: &[u8]) -> Result<String, SealError> {
    if sealed.len() < NONCE_BYTES + TAG_BYTES
        || sealed.len() > NONCE_BYTES + MAX_PLAINTEXT_BYTES + TAG_BYTES
    {
        return Err(SealError::Malformed);
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
    let nonce = <[u8; NONCE_BYTES]>::try_from(nonce).map_err(|_| SealError::Malformed)?;
    let plaintext = cipher
        .decrypt(
            &XNonce::from(nonce),
            Payload {
                msg: ciphertext,
                aad: job_id.as_bytes(),
            },
        )
        .map_err(|_| SealError::NotAuthentic)?;
    String::from_utf8(plaintext).map_err(|_| SealError::NotText)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINK: &str =
        "https://usher.example/reset?token=3fA9xQ-abcdefghijklmnopqrstuvwxyz0123456789";
    const JOB: &str = "0190f1f2-7c1e-7a3b-9c4d-5e6f7a8b9c0d";

    fn sealer() -> Sealer {
        Sealer::new(&[7u8; KEY_BYTES], "k1")
    }

    #[test]
    fn round_trip() {
        let sealer = sealer();
        let sealed = sealer.seal(JOB, LINK);
        assert_eq!(sealed.len(), NONCE_BYTES + LINK.len() + TAG_BYTES);
        assert_eq!(sealer.open(JOB, &sealed).expect("opens"), LINK);
        assert_eq!(sealer.open(JOB, &sealer.seal(JOB, "")).expect("empty"), "");
    }

    #[test]
    fn layout_is_nonce_then_ciphertext_and_tag_with_the_job_id_as_associated_data() {
        // Opened with the crate directly, as the documented layout says: any
        // implementation of the contract can read it.
        let key = [9u8; KEY_BYTES];
        let sealed = Sealer::new(&key, "k1").seal(JOB, LINK);
        let (nonce, rest) = sealed.split_at(NONCE_BYTES);
        let nonce = <[u8; NONCE_BYTES]>::try_from(nonce).expect("24 bytes");
        let opened = XChaCha20Poly1305::new(&key.into())
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: rest,
                    aad: JOB.as_bytes(),
                },
            )
            .expect("documented layout");
        assert_eq!(opened, LINK.as_bytes());
        assert!(
            !sealed.windows(5).any(|w| w == b"token"),
            "no plaintext in the sealed bytes"
        );
    }

    /// Hex to bytes (test vectors are written in hex in the docs).
    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// The test vectors of `docs/notification.md` ("The seal format") and
    /// `email_job.proto`, computed with libsodium's
    /// `crypto_aead_xchacha20poly1305_ietf_encrypt` (PyNaCl), so two
    /// implementations agree on them; `examples/python-consumer` checks them
    /// too.
    const VECTORS: [(&str, &str, &str, &str, &str); 2] = [
        (
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            "404142434445464748494a4b4c4d4e4f5051525354555657",
            "0190f1f2-7c1e-7a3b-9c4d-5e6f7a8b9c0d",
            "https://usher.example/invite?token=3fA9xQ2bLmN8pR4sT6uV0wY1zA3cE5gI7kM9oQ1sU3w",
            "404142434445464748494a4b4c4d4e4f5051525354555657bc4d7100a3da5639fa87efdbddb200eaf3d7dda876763af41c58892036704cfb73973f5d33d3bd68ae8096006794e281c95f0ebc59f0e2acc1a5398e52812f116f4cb1457ffe7ca7d432c3aaef0e0baeb45fefed9247f2577c851a2e6f3a",
        ),
        (
            "//79/Pv6+fj39vX08/Lx8O/u7ezr6uno5+bl5OPi4eA=",
            "000000000000000000000000000000000000000000000000",
            "3b2d8f0e-4a6c-4e1b-9d7f-2c5a8e0b1d3f",
            "https://usher.example/reset?token=Zz",
            "000000000000000000000000000000000000000000000000cbaf396e72f5735c8342348a53abb4958054434a5ec912a9ce21972f6f81414d6268ede04c7a5f03e394316580ed6aabdf261502",
        ),
    ];

    #[test]
    fn the_documented_test_vectors_seal_and_open() {
        for (key, nonce, job_id, link, sealed) in VECTORS {
            let config = SealConfig {
                key: Secret::new(key),
                key_id: "vector".into(),
                ..SealConfig::default()
            };
            let sealer = Sealer::from_config(&config).expect("base64 key of 32 bytes");
            let nonce = <[u8; NONCE_BYTES]>::try_from(hex(nonce)).expect("24-byte nonce");
            let expected = hex(sealed);
            assert_eq!(
                sealer.seal_with_nonce(job_id, link, nonce).expect("sealed"),
                expected,
                "{job_id}"
            );
            assert_eq!(expected.len(), NONCE_BYTES + link.len() + TAG_BYTES);
            assert_eq!(sealer.open(job_id, &expected).expect("opens"), link);
        }
    }

    #[test]
    fn another_job_id_does_not_open() {
        let sealer = sealer();
        let sealed = sealer.seal(JOB, LINK);
        assert_eq!(
            sealer.open("another-job", &sealed),
            Err(SealError::NotAuthentic)
        );
        assert_eq!(sealer.open("", &sealed), Err(SealError::NotAuthentic));
    }

    #[test]
    fn every_altered_byte_is_detected() {
        let sealer = sealer();
        let sealed = sealer.seal(JOB, LINK);
        for index in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[index] ^= 0x01;
            assert_eq!(
                sealer.open(JOB, &tampered),
                Err(SealError::NotAuthentic),
                "byte {index}"
            );
        }
        let mut truncated = sealed.clone();
        truncated.pop();
        assert_eq!(sealer.open(JOB, &truncated), Err(SealError::NotAuthentic));
        let mut extended = sealed;
        extended.push(0);
        assert_eq!(sealer.open(JOB, &extended), Err(SealError::NotAuthentic));
    }

    #[test]
    fn during_a_rotation_the_previous_key_still_opens_its_jobs_and_never_seals() {
        let old = SealConfig {
            key: Secret::new(STANDARD.encode([1u8; KEY_BYTES])),
            key_id: "2026-01".into(),
            ..SealConfig::default()
        };
        let new = SealConfig {
            key: Secret::new(STANDARD.encode([2u8; KEY_BYTES])),
            key_id: "2026-07".into(),
            ..SealConfig::default()
        };
        let rotating = SealConfig {
            previous_key: old.key.clone(),
            previous_key_id: old.key_id.clone(),
            ..new.clone()
        };
        rotating
            .validate_for(Environment::Production)
            .expect("valid");
        let opener = Sealer::from_config(&rotating).expect("sealer");
        let sealed_old = Sealer::from_config(&old).expect("old").seal(JOB, LINK);
        let sealed_new = Sealer::from_config(&new).expect("new").seal(JOB, LINK);
        assert_eq!(
            opener.open_with_key_id("2026-01", JOB, &sealed_old),
            Ok(LINK.to_owned())
        );
        assert_eq!(
            opener.open_with_key_id("2026-07", JOB, &sealed_new),
            Ok(LINK.to_owned())
        );
        // The id selects the key; a wrong pairing fails the tag.
        assert_eq!(
            opener.open_with_key_id("2026-07", JOB, &sealed_old),
            Err(SealError::NotAuthentic)
        );
        assert_eq!(
            opener.open_with_key_id("2025-01", JOB, &sealed_old),
            Err(SealError::UnknownKey)
        );
        // New seals use the current key only.
        assert_eq!(opener.key_id(), "2026-07");
        let resealed = opener.seal(JOB, LINK);
        assert_eq!(
            Sealer::from_config(&new).expect("new").open(JOB, &resealed),
            Ok(LINK.to_owned())
        );
        // Without a previous key, only the current id opens.
        let plain = Sealer::from_config(&new).expect("new");
        assert_eq!(
            plain.open_with_key_id("2026-01", JOB, &sealed_old),
            Err(SealError::UnknownKey)
        );

        for (config, field) in [
            (
                SealConfig {
                    previous_key_id: String::new(),
                    ..rotating.clone()
                },
                "seal.previous_key_id",
            ),
            (
                SealConfig {
                    previous_key_id: "2026-07".into(),
                    ..rotating.clone()
                },
                "seal.previous_key_id",
            ),
            (
                SealConfig {
                    previous_key: Secret::new("short"),
                    ..rotating.clone()
                },
                "seal.previous_key",
            ),
        ] {
            let err = config
                .validate_for(Environment::Development)
                .expect_err("invalid");
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn another_key_does_not_open() {
        let sealed = sealer().seal(JOB, LINK);
        let other = Sealer::new(&[8u8; KEY_BYTES], "k1");
        assert_eq!(other.open(JOB, &sealed), Err(SealError::NotAuthentic));
        let development = Sealer::from_config(&SealConfig::default()).expect("dev key");
        assert_eq!(development.open(JOB, &sealed), Err(SealError::NotAuthentic));
    }

    #[test]
    fn every_seal_draws_a_new_nonce() {
        let sealer = sealer();
        let first = sealer.seal(JOB, LINK);
        let second = sealer.seal(JOB, LINK);
        assert_ne!(first[..NONCE_BYTES], second[..NONCE_BYTES]);
        assert_ne!(first, second);
        assert_eq!(sealer.open(JOB, &second).expect("opens"), LINK);
    }

    #[test]
    fn malformed_and_oversized_values_are_refused() {
        let sealer = sealer();
        assert_eq!(sealer.open(JOB, &[]), Err(SealError::Malformed));
        assert_eq!(
            sealer.open(JOB, &[0u8; NONCE_BYTES + TAG_BYTES - 1]),
            Err(SealError::Malformed)
        );
        assert_eq!(
            sealer.open(
                JOB,
                &vec![0u8; NONCE_BYTES + MAX_PLAINTEXT_BYTES + TAG_BYTES + 1]
            ),
            Err(SealError::Malformed)
        );
        let long = "a".repeat(MAX_PLAINTEXT_BYTES + 1);
        assert_eq!(sealer.try_seal(JOB, &long), Err(SealError::TooLong));
    }

    #[test]
    fn config_is_validated_and_the_development_key_is_refused_in_production() {
        let development = SealConfig::default();
        development
            .validate_for(Environment::Development)
            .expect("dev");
        let err = development
            .validate_for(Environment::Production)
            .expect_err("public key");
        assert!(err.to_string().contains("seal.key"), "{err}");

        let configured = SealConfig {
            key: Secret::new(STANDARD.encode([3u8; KEY_BYTES])),
            key_id: "2026-01".into(),
            ..SealConfig::default()
        };
        configured
            .validate_for(Environment::Production)
            .expect("configured");
        let sealer = Sealer::from_config(&configured).expect("sealer");
        assert_eq!(sealer.key_id(), "2026-01");
        assert_eq!(
            Sealer::new(&[3u8; KEY_BYTES], "x")
                .open(JOB, &sealer.seal(JOB, LINK))
                .expect("same key"),
            LINK
        );

        for (config, field) in [
            (
                SealConfig {
                    key: Secret::new("not base64!"),
                    ..SealConfig::default()
                },
                "seal.key",
            ),
            (
                SealConfig {
                    key: Secret::new(STANDARD.encode([1u8; 16])),
                    ..SealConfig::default()
                },
                "seal.key",
            ),
            (
                SealConfig {
                    key_id: String::new(),
                    ..SealConfig::default()
                },
                "seal.key_id",
            ),
            (
                SealConfig {
                    key_id: "a b".into(),
                    ..SealConfig::default()
                },
                "seal.key_id",
            ),
            (
                SealConfig {
                    key_id: "k".repeat(65),
                    ..SealConfig::default()
                },
                "seal.key_id",
            ),
        ] {
            let err = config
                .validate_for(Environment::Development)
                .expect_err("invalid");
            assert!(err.to_string().contains(field), "{err}");
        }
        let err =
            serde_json::from_str::<SealConfig>(r#"{"secret": "x"}"#).expect_err("unknown key");
        assert!(err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn debug_never_shows_the_key() {
        let config = SealConfig {
            key: Secret::new(STANDARD.encode([5u8; KEY_BYTES])),
            key_id: "k9".into(),
            previous_key: Secret::new(STANDARD.encode([6u8; KEY_BYTES])),
            previous_key_id: "k8".into(),
        };
        let shown = format!(
            "{config:?} {:?}",
            Sealer::from_config(&config).expect("sealer")
        );
        assert!(!shown.contains(config.key.expose()), "{shown}");
        assert!(!shown.contains(config.previous_key.expose()), "{shown}");
        assert!(shown.contains("k9") && shown.contains("k8"), "{shown}");
    }
}
