//! Secrets handed to users: invitation, password-reset and set-password
//! links, session access and refresh tokens, API key secrets (P1, P5).
//!
//! A [`Token`] is 256 bits from the operating system's CSPRNG, written as
//! base64url without padding (43 characters). Usher keeps only its keyed hash:
//! [`TokenHasher::hash`] is `hex(HMAC-SHA256(key, purpose || 0x00 || token))`.
//! The key means a stolen database or Redis dump cannot be checked against
//! guessed tokens offline, and the purpose means a token issued for one use
//! (say an invitation) never matches the stored hash of another (a session).

use std::fmt;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use rand::{TryRngCore, rngs::OsRng};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{ConfigError, Environment, Secret};

/// Bytes of randomness in a token: 256 bits.
pub const TOKEN_BYTES: usize = 32;
/// Length of a token without prefix: 32 bytes in base64url without padding.
pub const TOKEN_CHARS: usize = 43;
/// Shortest accepted HMAC key, in bytes.
pub const MIN_KEY_BYTES: usize = 32;
/// Prefix of API key secrets, so a leaked key is recognisable (secret scanners).
pub const API_KEY_PREFIX: &str = "usk_";

/// The HMAC key used when none is configured. It is public, so
/// `environment = "production"` refuses it.
const DEVELOPMENT_KEY: &[u8; 32] = b"usher-insecure-development-hmac!";
const CONFIG_FIELD: &str = "tokens.hmac_key";

/// A secret handed to a user. `Debug` never shows it and there is no
/// `Display`, so it cannot end up in a log by accident (P20); read it with
/// [`Token::as_str`] where it goes into a link or a response.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

/// The operating system's random number generator failed.
#[derive(Debug, thiserror::Error)]
#[error("os random number generator failed: {0}")]
pub struct EntropyError(String);

impl Token {
    /// A new token of 256 random bits from the OS CSPRNG.
    ///
    /// # Panics
    ///
    /// When the OS random number generator fails. On the supported platforms
    /// it blocks until seeded at boot and does not fail afterwards; without
    /// entropy no token may be issued, so this fails closed. Use
    /// [`Token::try_generate`] to get the error instead.
    pub fn generate() -> Self {
        match Self::try_generate() {
            Ok(token) => token,
            Err(error) => panic!("{error}"),
        }
    }

    /// A new token, or the error of the OS random number generator.
    pub fn try_generate() -> Result<Self, EntropyError> {
        Self::try_generate_with_prefix("")
    }

    /// A new token after `prefix`, e.g. [`API_KEY_PREFIX`]: the prefix plus 43
    /// random characters. The prefix should be URL-safe; it adds no secrecy.
    ///
    /// # Panics
    ///
    /// As [`Token::generate`].
    pub fn generate_with_prefix(prefix: &str) -> Self {
        match Self::try_generate_with_prefix(prefix) {
            Ok(token) => token,
            Err(error) => panic!("{error}"),
        }
    }

    /// As [`Token::generate_with_prefix`], returning the RNG's error.
    pub fn try_generate_with_prefix(prefix: &str) -> Result<Self, EntropyError> {
        let mut bytes = [0u8; TOKEN_BYTES];
        OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|error| EntropyError(error.to_string()))?;
        let mut token = String::with_capacity(prefix.len() + TOKEN_CHARS);
        token.push_str(prefix);
        URL_SAFE_NO_PAD.encode_string(bytes, &mut token);
        Ok(Self(token))
    }

    /// The token, for the link or response that hands it to its user.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// What a token is for. The purpose is part of the hashed message, so a token
/// of one kind never matches a stored hash of another (P5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenPurpose {
    /// An invitation link.
    Invitation,
    /// A password-reset link.
    PasswordReset,
    /// A session's access token.
    SessionAccess,
    /// A session's refresh token.
    SessionRefresh,
    /// An API key's secret.
    ApiKey,
    /// The "choose your password" link of a user created without one.
    SetPassword,
}

impl TokenPurpose {
    /// Every purpose.
    pub const ALL: [Self; 6] = [
        Self::Invitation,
        Self::PasswordReset,
        Self::SessionAccess,
        Self::SessionRefresh,
        Self::ApiKey,
        Self::SetPassword,
    ];

    /// The tag hashed before the token. It never changes: stored hashes depend on it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Invitation => "invitation",
            Self::PasswordReset => "password_reset",
            Self::SessionAccess => "session_access",
            Self::SessionRefresh => "session_refresh",
            Self::ApiKey => "api_key",
            Self::SetPassword => "set_password",
        }
    }
}

/// The key of the token hashes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TokenConfig {
    /// HMAC-SHA256 key, at least 32 bytes, in base64; empty means the public
    /// development key (refused in production). Changing it invalidates every
    /// outstanding token.
    pub hmac_key: Secret,
}

impl TokenConfig {
    /// Checks the key, refusing the development key in production.
    pub fn validate_for(&self, environment: Environment) -> Result<(), ConfigError> {
        let key = self.key()?;
        check_key_length(&key)?;
        if environment == Environment::Production && key.as_slice() == DEVELOPMENT_KEY {
            return Err(ConfigError::invalid(
                CONFIG_FIELD,
                "required in production (the development key is public)",
            ));
        }
        Ok(())
    }

    fn key(&self) -> Result<Vec<u8>, ConfigError> {
        if self.hmac_key.is_empty() {
            return Ok(DEVELOPMENT_KEY.to_vec());
        }
        base64::engine::general_purpose::STANDARD
            .decode(self.hmac_key.expose().trim())
            .map_err(|_| ConfigError::invalid(CONFIG_FIELD, "must be base64"))
    }
}

/// Computes the stored form of tokens: `hex(HMAC-SHA256(key, purpose || 0x00 || token))`.
/// Cheap to clone; `Debug` never shows the key.
#[derive(Clone)]
pub struct TokenHasher {
    /// The keyed MAC before any input, cloned for each hash.
    mac: Hmac<Sha256>,
}

impl TokenHasher {
    /// A hasher with `key`, which must be at least [`MIN_KEY_BYTES`] long.
    pub fn new(key: &[u8]) -> Result<Self, ConfigError> {
        check_key_length(key)?;
        let mac = Hmac::<Sha256>::new_from_slice(key)
            .map_err(|_| ConfigError::invalid(CONFIG_FIELD, "not a usable hmac key"))?;
        Ok(Self { mac })
    }

    /// The hasher of the configured key (the development key when empty).
    pub fn from_config(config: &TokenConfig) -> Result<Self, ConfigError> {
        Self::new(&config.key()?)
    }

    fn digest(&self, purpose: TokenPurpose, token: &str) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(purpose.as_str().as_bytes());
        // The separator keeps purpose and token apart: no tag is a prefix of
        // another followed by NUL, so no two (purpose, token) pairs collide.
        mac.update(&[0]);
        mac.update(token.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The stored form of `token` used for `purpose`: 64 lowercase hex digits.
    pub fn hash(&self, purpose: TokenPurpose, token: &str) -> String {
        hex::encode(self.digest(purpose, token))
    }

    /// Whether `token` used for `purpose` has the stored hash `stored`, compared
    /// in constant time. Lookups by hash need no such check; this is for a hash
    /// read by another key (e.g. a session id).
    pub fn verify(&self, purpose: TokenPurpose, token: &str, stored: &str) -> bool {
        let computed = self.hash(purpose, token);
        computed.as_bytes().ct_eq(stored.as_bytes()).into()
    }
}

impl fmt::Debug for TokenHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHasher(<redacted>)")
    }
}

fn check_key_length(key: &[u8]) -> Result<(), ConfigError> {
    if key.len() < MIN_KEY_BYTES {
        return Err(ConfigError::invalid(
            CONFIG_FIELD,
            format!("must be at least {MIN_KEY_BYTES} bytes"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    const KEY_A: &[u8] = &[7u8; 32];
    const KEY_B: &[u8] = &[8u8; 32];

    fn is_base64url(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '-' || c == '_'
    }

    #[test]
    fn tokens_are_43_base64url_chars_of_32_bytes_and_unique() {
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            let token = Token::generate();
            let s = token.as_str();
            assert_eq!(s.len(), TOKEN_CHARS, "{s}");
            assert!(s.chars().all(is_base64url), "{s}");
            let decoded = URL_SAFE_NO_PAD.decode(s).expect("base64url");
            assert_eq!(decoded.len(), TOKEN_BYTES);
            assert!(seen.insert(s.to_owned()), "duplicate token");
        }
        assert_eq!(seen.len(), 10_000);
    }

    #[test]
    fn tokens_use_the_whole_alphabet() {
        // 256 random bits per token: over 1,000 tokens every one of the 64
        // symbols shows up (a constant or biased source would not).
        let symbols: HashSet<char> = (0..1_000)
            .flat_map(|_| Token::generate().as_str().chars().collect::<Vec<_>>())
            .collect();
        assert_eq!(symbols.len(), 64);
    }

    #[test]
    fn prefixed_tokens_keep_the_prefix_and_full_entropy() {
        let token = Token::generate_with_prefix(API_KEY_PREFIX);
        let s = token.as_str();
        assert_eq!(s.len(), API_KEY_PREFIX.len() + TOKEN_CHARS);
        let rest = s.strip_prefix(API_KEY_PREFIX).expect("prefix");
        assert_eq!(URL_SAFE_NO_PAD.decode(rest).expect("base64url").len(), 32);
        assert_ne!(
            Token::generate_with_prefix(API_KEY_PREFIX).as_str(),
            token.as_str()
        );
    }

    #[test]
    fn debug_never_shows_the_token_or_the_key() {
        let token = Token::generate();
        let shown = format!("{token:?} {:?}", Some(&token));
        assert!(!shown.contains(token.as_str()), "{shown}");
        assert!(shown.contains("<redacted>"));

        let hasher = TokenHasher::new(b"0123456789abcdef0123456789abcdef").expect("hasher");
        let shown = format!("{hasher:?}");
        assert!(!shown.contains("0123456789abcdef"), "{shown}");

        let config = TokenConfig {
            hmac_key: Secret::new("c2VjcmV0LWtleS1tYXRlcmlhbC0wMTIzNDU2Nzg5YWI="),
        };
        assert!(!format!("{config:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn hash_matches_hmac_sha256_of_purpose_nul_token() {
        // Pins the stored format: python3 -c "import hmac,hashlib;
        // print(hmac.new(bytes(range(32)), b'invitation\x00abc', hashlib.sha256).hexdigest())"
        let key: Vec<u8> = (0u8..32).collect();
        let hasher = TokenHasher::new(&key).expect("hasher");
        assert_eq!(
            hasher.hash(TokenPurpose::Invitation, "abc"),
            "30c0fd72bffd93fe9c527ca11283850846085d915da1c987c93edb71684dc724"
        );
    }

    #[test]
    fn hash_is_deterministic_per_key() {
        let token = Token::generate();
        let a = TokenHasher::new(KEY_A).expect("hasher");
        let again = TokenHasher::new(KEY_A).expect("hasher");
        let first = a.hash(TokenPurpose::Invitation, token.as_str());
        assert_eq!(first, a.hash(TokenPurpose::Invitation, token.as_str()));
        assert_eq!(first, again.hash(TokenPurpose::Invitation, token.as_str()));
        assert_eq!(
            first,
            a.clone().hash(TokenPurpose::Invitation, token.as_str())
        );
        assert_eq!(first.len(), 64);
        assert!(
            first
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
    }

    #[test]
    fn hash_differs_across_purposes() {
        let hasher = TokenHasher::new(KEY_A).expect("hasher");
        let token = Token::generate();
        let hashes: HashSet<String> = TokenPurpose::ALL
            .iter()
            .map(|&purpose| hasher.hash(purpose, token.as_str()))
            .collect();
        assert_eq!(hashes.len(), TokenPurpose::ALL.len());
        let tags: HashSet<&str> = TokenPurpose::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(tags.len(), TokenPurpose::ALL.len());
    }

    #[test]
    fn hash_differs_across_keys_and_tokens() {
        let a = TokenHasher::new(KEY_A).expect("hasher");
        let b = TokenHasher::new(KEY_B).expect("hasher");
        let token = Token::generate();
        let other = Token::generate();
        let purpose = TokenPurpose::PasswordReset;
        assert_ne!(
            a.hash(purpose, token.as_str()),
            b.hash(purpose, token.as_str())
        );
        assert_ne!(
            a.hash(purpose, token.as_str()),
            a.hash(purpose, other.as_str())
        );
    }

    #[test]
    fn hash_never_contains_the_token() {
        let hasher = TokenHasher::new(KEY_A).expect("hasher");
        for _ in 0..1_000 {
            let token = Token::generate();
            for purpose in TokenPurpose::ALL {
                let hash = hasher.hash(purpose, token.as_str());
                assert!(!hash.contains(token.as_str()));
                assert!(!hash.contains(&token.as_str()[..16]));
            }
        }
    }

    #[test]
    fn verify_accepts_only_the_same_token_and_purpose() {
        let hasher = TokenHasher::new(KEY_A).expect("hasher");
        let token = Token::generate();
        let stored = hasher.hash(TokenPurpose::SessionRefresh, token.as_str());
        assert!(hasher.verify(TokenPurpose::SessionRefresh, token.as_str(), &stored));
        assert!(!hasher.verify(TokenPurpose::SessionAccess, token.as_str(), &stored));
        assert!(!hasher.verify(
            TokenPurpose::SessionRefresh,
            Token::generate().as_str(),
            &stored
        ));
        assert!(!hasher.verify(TokenPurpose::SessionRefresh, token.as_str(), ""));
        assert!(!hasher.verify(TokenPurpose::SessionRefresh, token.as_str(), &stored[..63]));
        let other = TokenHasher::new(KEY_B).expect("hasher");
        assert!(!other.verify(TokenPurpose::SessionRefresh, token.as_str(), &stored));
    }

    #[test]
    fn short_keys_are_refused() {
        let err = TokenHasher::new(&[1u8; 31]).expect_err("31 bytes");
        assert!(err.to_string().contains("tokens.hmac_key"), "{err}");
        assert!(err.to_string().contains("at least 32 bytes"), "{err}");
        TokenHasher::new(&[1u8; 32]).expect("32 bytes");
        TokenHasher::new(&[1u8; 64]).expect("64 bytes");
    }

    fn base64_key(bytes: &[u8]) -> TokenConfig {
        TokenConfig {
            hmac_key: Secret::new(base64::engine::general_purpose::STANDARD.encode(bytes)),
        }
    }

    #[test]
    fn default_config_uses_the_development_key_outside_production() {
        let config = TokenConfig::default();
        config
            .validate_for(Environment::Development)
            .expect("development");
        let dev = TokenHasher::from_config(&config).expect("hasher");
        let explicit = TokenHasher::new(DEVELOPMENT_KEY).expect("hasher");
        let token = Token::generate();
        assert_eq!(
            dev.hash(TokenPurpose::ApiKey, token.as_str()),
            explicit.hash(TokenPurpose::ApiKey, token.as_str())
        );
    }

    #[test]
    fn production_refuses_the_development_key() {
        let err = TokenConfig::default()
            .validate_for(Environment::Production)
            .expect_err("empty key in production");
        assert!(err.to_string().contains("tokens.hmac_key"), "{err}");
        // Nor may the public key be pasted in explicitly.
        let err = base64_key(DEVELOPMENT_KEY)
            .validate_for(Environment::Production)
            .expect_err("development key in production");
        assert!(err.to_string().contains("tokens.hmac_key"), "{err}");
    }

    #[test]
    fn config_validation_checks_encoding_and_length() {
        let config = base64_key(&[9u8; 32]);
        config
            .validate_for(Environment::Production)
            .expect("32-byte key");
        TokenHasher::from_config(&config).expect("hasher");

        let short = base64_key(&[9u8; 16]);
        for environment in [Environment::Development, Environment::Production] {
            let err = short.validate_for(environment).expect_err("short key");
            assert!(err.to_string().contains("tokens.hmac_key"), "{err}");
        }
        TokenHasher::from_config(&short).expect_err("short key");

        let garbled = TokenConfig {
            hmac_key: Secret::new("not base64!"),
        };
        let err = garbled
            .validate_for(Environment::Development)
            .expect_err("not base64");
        assert!(err.to_string().contains("must be base64"), "{err}");
        assert!(!err.to_string().contains("not base64!"), "{err}");
    }

    #[test]
    fn config_rejects_unknown_fields() {
        let config: TokenConfig = serde_json::from_str("{}").expect("defaults");
        assert_eq!(config, TokenConfig::default());
        serde_json::from_str::<TokenConfig>(r#"{"hmac_keys": "x"}"#).expect_err("unknown field");
    }
}
