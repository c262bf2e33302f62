//! Who is calling (P14, P16). The gateway authenticates the caller, then
//! attaches a short-lived **principal assertion** it signs with Ed25519; a
//! service calling another signs its own. Services verify the assertion — the
//! signature, the issuer, the expiry and the gRPC path it was issued for —
//! and take the account only from it, never from a request field.
//!
//! Wire form (header [`ASSERTION_HEADER`]): `base64url(json) "." base64url(signature)`.
//! Asymmetric keys mean a service that can verify cannot forge.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    config::{ConfigError, Environment, Secret},
    error::{ApiError, Reason},
};

/// The metadata key of the assertion.
pub const ASSERTION_HEADER: &str = "x-usher-assertion";
/// Prefix of every metadata key Usher reserves; the gateway strips client-sent ones.
pub const RESERVED_HEADER_PREFIX: &str = "x-usher-";
/// Seed of the development key pair used when no key is configured. It is
/// public, so `environment = "production"` refuses it.
const DEVELOPMENT_SEED: [u8; 32] = *b"usher-insecure-development-key!!";

/// What kind of caller a principal is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// No credential (public RPCs).
    Anonymous,
    /// A signed-in member of an account (session).
    User,
    /// An account-scoped API key.
    ApiKey,
    /// A platform API key.
    Platform,
    /// Another Usher service.
    Service,
}

/// The verified caller of an RPC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// What kind of caller this is.
    pub kind: PrincipalKind,
    /// The caller's account (users and account API keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<Uuid>,
    /// The signed-in user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
    /// The session or API key id (not the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    /// Permissions held, from the role (or the key's scope).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// The calling service, for `Service` principals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The signed-in user must change their password first: MEMBER and
    /// PERMISSION RPCs refuse this principal with `PASSWORD_CHANGE_REQUIRED`,
    /// except those whose rule is `allowed_before_password_change`. Only
    /// sessions carry it (API keys have no password).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub password_change_required: bool,
}

impl Principal {
    /// A caller without credential.
    pub fn anonymous() -> Self {
        Self {
            kind: PrincipalKind::Anonymous,
            account_id: None,
            user_id: None,
            credential_id: None,
            permissions: Vec::new(),
            service: None,
            password_change_required: false,
        }
    }

    /// An Usher service calling another.
    pub fn service(name: impl Into<String>) -> Self {
        Self {
            kind: PrincipalKind::Service,
            service: Some(name.into()),
            ..Self::anonymous()
        }
    }

    /// Whether the principal holds `permission`.
    pub fn has_permission(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission)
    }

    /// The caller's account: the only source of tenancy for member RPCs.
    pub fn account(&self) -> Result<Uuid, ApiError> {
        self.account_id
            .ok_or_else(|| ApiError::rejected(Reason::Unauthenticated, "no account in credential"))
    }

    /// The calling user.
    pub fn user(&self) -> Result<Uuid, ApiError> {
        self.user_id.ok_or_else(|| {
            ApiError::rejected(Reason::PermissionDenied, "a signed-in user is required")
        })
    }

    /// Whether this is an account member (session or account API key).
    pub fn is_member(&self) -> bool {
        matches!(self.kind, PrincipalKind::User | PrincipalKind::ApiKey)
            && self.account_id.is_some()
    }
}

/// The signed statement carried by [`ASSERTION_HEADER`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assertion {
    /// Who signed it (`usher-gateway`, `usher-invitation`, …).
    pub iss: String,
    /// The gRPC path it is valid for; it cannot be replayed on another RPC.
    pub path: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// The request id, for log correlation across services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rid: Option<String>,
    /// The caller.
    pub principal: Principal,
}

/// Why an assertion was refused. Callers answer `UNAUTHENTICATED` for all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssertionError {
    /// No assertion on the call.
    #[error("missing principal assertion")]
    Missing,
    /// Not of the `payload.signature` form, or not decodable.
    #[error("malformed principal assertion")]
    Malformed,
    /// Signed by an issuer this service does not trust.
    #[error("untrusted assertion issuer")]
    UntrustedIssuer,
    /// The signature does not verify.
    #[error("bad assertion signature")]
    BadSignature,
    /// Expired, or issued in the future beyond the allowed skew.
    #[error("assertion expired")]
    Expired,
    /// Issued for another RPC.
    #[error("assertion issued for another method")]
    WrongPath,
}

/// Keys of the principal assertion.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AssertionConfig {
    /// This binary's Ed25519 signing key, the 32-byte seed in base64; empty
    /// means the public development key (refused in production).
    pub signing_key: Secret,
    /// Issuer name → Ed25519 public key (base64) of every signer this service
    /// trusts; empty means the development key for the standard issuers.
    pub trusted_issuers: BTreeMap<String, String>,
    /// Lifetime of an assertion this binary signs, in seconds.
    pub ttl_secs: u32,
    /// Tolerated clock difference between machines, in seconds.
    pub clock_skew_secs: u32,
}

impl Default for AssertionConfig {
    fn default() -> Self {
        Self {
            signing_key: Secret::default(),
            trusted_issuers: BTreeMap::new(),
            ttl_secs: 60,
            clock_skew_secs: 5,
        }
    }
}

/// The issuers trusted by default in development.
pub const STANDARD_ISSUERS: &[&str] = &[
    "usher-gateway",
    "usher-identity",
    "usher-invitation",
    "usher-notification",
];

impl AssertionConfig {
    /// Checks the keys, refusing development keys in production.
    pub fn validate_for(&self, environment: Environment) -> Result<(), ConfigError> {
        if self.ttl_secs == 0 || self.ttl_secs > 600 {
            return Err(ConfigError::invalid(
                "assertion.ttl_secs",
                "must be between 1 and 600",
            ));
        }
        if environment == Environment::Production {
            if self.signing_key.is_empty() {
                return Err(ConfigError::invalid(
                    "assertion.signing_key",
                    "required in production (the development key is public)",
                ));
            }
            if self.trusted_issuers.is_empty() {
                return Err(ConfigError::invalid(
                    "assertion.trusted_issuers",
                    "required in production (the development key is public)",
                ));
            }
        }
        self.signing_key()?;
        for (issuer, key) in &self.trusted_issuers {
            decode_verifying_key(key).map_err(|message| {
                ConfigError::invalid(format!("assertion.trusted_issuers.{issuer}"), message)
            })?;
        }
        Ok(())
    }

    fn signing_key(&self) -> Result<SigningKey, ConfigError> {
        if self.signing_key.is_empty() {
            return Ok(SigningKey::from_bytes(&DEVELOPMENT_SEED));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.signing_key.expose().trim())
            .map_err(|_| ConfigError::invalid("assertion.signing_key", "must be base64"))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| ConfigError::invalid("assertion.signing_key", "must be 32 bytes"))?;
        Ok(SigningKey::from_bytes(&seed))
    }

    /// The signer of this binary, issuing as `issuer`.
    pub fn signer(&self, issuer: &str) -> Result<AssertionSigner, ConfigError> {
        Ok(AssertionSigner {
            issuer: issuer.to_owned(),
            key: self.signing_key()?,
            ttl_secs: i64::from(self.ttl_secs),
        })
    }

    /// The verifier of this binary.
    pub fn verifier(&self) -> Result<AssertionVerifier, ConfigError> {
        let mut keys = BTreeMap::new();
        if self.trusted_issuers.is_empty() {
            let dev = SigningKey::from_bytes(&DEVELOPMENT_SEED).verifying_key();
            for issuer in STANDARD_ISSUERS {
                keys.insert((*issuer).to_owned(), dev);
            }
        }
        for (issuer, key) in &self.trusted_issuers {
            let key = decode_verifying_key(key).map_err(|message| {
                ConfigError::invalid(format!("assertion.trusted_issuers.{issuer}"), message)
            })?;
            keys.insert(issuer.clone(), key);
        }
        Ok(AssertionVerifier {
            keys,
            skew_secs: i64::from(self.clock_skew_secs),
        })
    }
}

fn decode_verifying_key(key: &str) -> Result<VerifyingKey, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .map_err(|_| "must be base64".to_owned())?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "must be 32 bytes".to_owned())?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "not an Ed25519 public key".to_owned())
}

/// A fresh key pair for configuration: (signing seed, public key), base64.
pub fn generate_key_pair() -> (String, String) {
    let seed: [u8; 32] = rand::random();
    let key = SigningKey::from_bytes(&seed);
    let engine = base64::engine::general_purpose::STANDARD;
    (
        engine.encode(seed),
        engine.encode(key.verifying_key().to_bytes()),
    )
}

/// Signs assertions.
#[derive(Clone)]
pub struct AssertionSigner {
    issuer: String,
    key: SigningKey,
    ttl_secs: i64,
}

impl std::fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionSigner")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl AssertionSigner {
    /// The issuer name this signer puts in assertions.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Signs an assertion for `principal` calling `path` at `now`.
    pub fn sign(
        &self,
        principal: &Principal,
        path: &str,
        request_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> String {
        let assertion = Assertion {
            iss: self.issuer.clone(),
            path: path.to_owned(),
            iat: now.timestamp(),
            exp: now.timestamp() + self.ttl_secs,
            rid: request_id.map(str::to_owned),
            principal: principal.clone(),
        };
        // Serializing plain data to JSON cannot fail.
        let payload = serde_json::to_vec(&assertion).unwrap_or_default();
        let signature = self.key.sign(&payload);
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        )
    }
}

/// Verifies assertions.
#[derive(Clone, Debug)]
pub struct AssertionVerifier {
    keys: BTreeMap<String, VerifyingKey>,
    skew_secs: i64,
}

impl AssertionVerifier {
    /// Verifies `token` for a call of `path` at `now` and returns the assertion.
    pub fn verify(
        &self,
        token: &str,
        path: &str,
        now: DateTime<Utc>,
    ) -> Result<Assertion, AssertionError> {
        let (payload, signature) = token.split_once('.').ok_or(AssertionError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| AssertionError::Malformed)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| AssertionError::Malformed)?;
        let signature = Signature::from_slice(&signature).map_err(|_| AssertionError::Malformed)?;
        let assertion: Assertion =
            serde_json::from_slice(&payload).map_err(|_| AssertionError::Malformed)?;
        let key = self
            .keys
            .get(&assertion.iss)
            .ok_or(AssertionError::UntrustedIssuer)?;
        key.verify(&payload, &signature)
            .map_err(|_| AssertionError::BadSignature)?;
        let now = now.timestamp();
        if assertion.exp + self.skew_secs < now || assertion.iat - self.skew_secs > now {
            return Err(AssertionError::Expired);
        }
        if assertion.path != path {
            return Err(AssertionError::WrongPath);
        }
        Ok(assertion)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn member() -> Principal {
        Principal {
            kind: PrincipalKind::User,
            account_id: Some(Uuid::new_v4()),
            user_id: Some(Uuid::new_v4()),
            credential_id: Some("s1".into()),
            permissions: vec!["users.read".into()],
            service: None,
            password_change_required: false,
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("valid")
    }

    const PATH: &str = "/usher.identity.v1.UserService/ListUsers";

    #[test]
    fn signed_assertion_verifies_for_its_path_only() {
        let config = AssertionConfig::default();
        let token = config.signer("usher-gateway").expect("signer").sign(
            &member(),
            PATH,
            Some("r1"),
            now(),
        );
        let verifier = config.verifier().expect("verifier");
        let assertion = verifier.verify(&token, PATH, now()).expect("verifies");
        assert_eq!(assertion.principal.permissions, ["users.read"]);
        assert_eq!(assertion.rid.as_deref(), Some("r1"));
        assert_eq!(
            verifier.verify(&token, "/usher.identity.v1.UserService/DeleteUser", now()),
            Err(AssertionError::WrongPath)
        );
    }

    #[test]
    fn expired_tampered_and_foreign_assertions_fail() {
        let config = AssertionConfig::default();
        let signer = config.signer("usher-gateway").expect("signer");
        let verifier = config.verifier().expect("verifier");
        let token = signer.sign(&member(), PATH, None, now());
        assert_eq!(
            verifier.verify(&token, PATH, now() + Duration::seconds(120)),
            Err(AssertionError::Expired)
        );
        // Forge: swap the payload for one granting more, keep the signature.
        let (_, sig) = token.split_once('.').expect("two parts");
        let mut forged = member();
        forged.permissions.push("users.manage".into());
        let other = signer.sign(&forged, PATH, None, now());
        let (payload, _) = other.split_once('.').expect("two parts");
        assert_eq!(
            verifier.verify(&format!("{payload}.{sig}"), PATH, now()),
            Err(AssertionError::BadSignature)
        );
        // A key nobody trusts.
        let (seed, _) = generate_key_pair();
        let rogue = AssertionConfig {
            signing_key: Secret::new(seed),
            ..Default::default()
        };
        let rogue_token =
            rogue
                .signer("usher-gateway")
                .expect("signer")
                .sign(&member(), PATH, None, now());
        assert_eq!(
            verifier.verify(&rogue_token, PATH, now()),
            Err(AssertionError::BadSignature)
        );
        let unknown = config
            .signer("someone")
            .expect("signer")
            .sign(&member(), PATH, None, now());
        assert_eq!(
            verifier.verify(&unknown, PATH, now()),
            Err(AssertionError::UntrustedIssuer)
        );
        assert_eq!(
            verifier.verify("garbage", PATH, now()),
            Err(AssertionError::Malformed)
        );
    }

    #[test]
    fn the_password_change_flag_travels_in_the_assertion() {
        let config = AssertionConfig::default();
        let signer = config.signer("usher-gateway").expect("signer");
        let verifier = config.verifier().expect("verifier");
        let mut pending = member();
        pending.password_change_required = true;
        let token = signer.sign(&pending, PATH, None, now());
        let assertion = verifier.verify(&token, PATH, now()).expect("verifies");
        assert!(assertion.principal.password_change_required);
        // Absent means false: assertions signed before the flag existed, and
        // every principal without it, read as settled.
        let token = signer.sign(&member(), PATH, None, now());
        let (payload, _) = token.split_once('.').expect("two parts");
        let json =
            String::from_utf8(URL_SAFE_NO_PAD.decode(payload).expect("base64")).expect("utf-8");
        assert!(!json.contains("password_change_required"), "{json}");
        let assertion = verifier.verify(&token, PATH, now()).expect("verifies");
        assert!(!assertion.principal.password_change_required);
    }

    #[test]
    fn configured_keys_replace_the_development_key() {
        let (seed, public) = generate_key_pair();
        let config = AssertionConfig {
            signing_key: Secret::new(seed),
            trusted_issuers: [("usher-gateway".to_owned(), public)].into(),
            ..Default::default()
        };
        config.validate_for(Environment::Production).expect("valid");
        let token =
            config
                .signer("usher-gateway")
                .expect("signer")
                .sign(&member(), PATH, None, now());
        config
            .verifier()
            .expect("verifier")
            .verify(&token, PATH, now())
            .expect("verifies");
        let dev = AssertionConfig::default();
        let dev_token =
            dev.signer("usher-gateway")
                .expect("signer")
                .sign(&member(), PATH, None, now());
        assert!(
            config
                .verifier()
                .expect("verifier")
                .verify(&dev_token, PATH, now())
                .is_err()
        );
        assert!(
            AssertionConfig::default()
                .validate_for(Environment::Production)
                .is_err()
        );
    }
}
