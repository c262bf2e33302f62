//! The demo account of `usher dev`: created on first start, as the
//! embedding platform would (`AccountService.CreateAccount`, called on the
//! identity service in this process with a platform principal signed by the
//! development key), and remembered in a state file (mode 0600) so a restart
//! prints the same credentials instead of creating a second account.

use std::path::Path;

use anyhow::Context as _;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tonic::transport::Endpoint;
use usher_kit::{
    clock::{Clock, SystemClock},
    principal::{ASSERTION_HEADER, Principal, PrincipalKind},
};
use usher_proto::identity::v1::{
    CreateAccountRequest, SignInRequest, account_service_client::AccountServiceClient,
    auth_service_client::AuthServiceClient, sign_in_request::Login,
};

use crate::{config, error::CallError};

/// The demo owner's sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The account's slug.
    pub account_slug: String,
    /// The owner's email.
    pub owner_email: String,
    /// The owner's password (a development account on this machine only).
    pub owner_password: String,
}

/// The owner's email of every demo account.
pub const OWNER_EMAIL: &str = "owner@example.com";

/// Reads the state file; `None` when it does not exist.
pub fn load(path: &Path) -> anyhow::Result<Option<Credentials>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a usher dev state file", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes the state file, readable by the owner only.
pub fn save(path: &Path, credentials: &Credentials) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let bytes = serde_json::to_vec_pretty(credentials)?;
    config::write_private(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// A password of 20 random letters and digits.
pub fn random_password() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(20)
        .map(char::from)
        .collect()
}

/// The credentials of the demo account: those of the state file when they
/// still sign in, else those of a new account.
pub async fn ensure(
    state: &Path,
    identity: &usher_identity::Config,
    identity_port: u16,
    gateway: &str,
) -> anyhow::Result<Credentials> {
    if let Some(saved) = load(state)? {
        match sign_in(gateway, &saved).await {
            Ok(()) => return Ok(saved),
            Err(error) if error.is("INVALID_CREDENTIALS") => {
                crate::output::note(format!(
                    "usher dev: the account in {} no longer signs in (another database?); creating a new one",
                    state.display()
                ));
            }
            Err(error) => {
                return Err(anyhow::Error::from(error).context("signing in the demo owner"));
            }
        }
    }
    let credentials = create(identity, identity_port).await?;
    save(state, &credentials)?;
    Ok(credentials)
}

async fn sign_in(gateway: &str, credentials: &Credentials) -> Result<(), CallError> {
    let channel = crate::client::channel(gateway).map_err(|e| CallError {
        code: tonic::Code::InvalidArgument,
        message: e.to_string(),
        reason: None,
        fields: Vec::new(),
        retry_after_secs: None,
    })?;
    AuthServiceClient::new(channel)
        .sign_in(SignInRequest {
            account_slug: credentials.account_slug.clone(),
            login: Some(Login::Email(credentials.owner_email.clone())),
            password: credentials.owner_password.clone(),
        })
        .await
        .map(|_| ())
        .map_err(CallError::from)
}

async fn create(identity: &usher_identity::Config, port: u16) -> anyhow::Result<Credentials> {
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?.connect_lazy();
    let signer = identity
        .assertion
        .signer("usher-gateway")
        .context("the development assertion key")?;
    let platform = Principal {
        kind: PrincipalKind::Platform,
        credential_id: Some("usher-dev".into()),
        ..Principal::anonymous()
    };
    let password = random_password();
    // `demo` first; if a previous state file was lost, a fresh slug.
    for attempt in 0..5 {
        let slug = if attempt == 0 {
            "demo".to_owned()
        } else {
            format!("demo-{}", random_password()[..6].to_lowercase())
        };
        let path = "/usher.identity.v1.AccountService/CreateAccount";
        let assertion = signer.sign(&platform, path, None, SystemClock.now());
        let mut request = tonic::Request::new(CreateAccountRequest {
            name: "Demo".into(),
            slug: slug.clone(),
            owner_email: OWNER_EMAIL.into(),
            owner_display_name: "Demo Owner".into(),
            owner_password: password.clone(),
            seat_limit: 50,
            ..Default::default()
        });
        request.metadata_mut().insert(
            ASSERTION_HEADER,
            assertion
                .parse()
                .context("the assertion is a header value")?,
        );
        match AccountServiceClient::new(channel.clone())
            .create_account(request)
            .await
        {
            Ok(_) => {
                return Ok(Credentials {
                    account_slug: slug,
                    owner_email: OWNER_EMAIL.into(),
                    owner_password: password,
                });
            }
            Err(status) => {
                let error = CallError::from(status);
                if !error.is("ALREADY_EXISTS") {
                    return Err(anyhow::Error::from(error).context("creating the demo account"));
                }
            }
        }
    }
    anyhow::bail!("could not find a free slug for the demo account")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_round_trips_and_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("usher-dev.json");
        assert_eq!(load(&path).expect("missing"), None);
        let credentials = Credentials {
            account_slug: "demo".into(),
            owner_email: OWNER_EMAIL.into(),
            owner_password: random_password(),
        };
        save(&path, &credentials).expect("saved");
        assert_eq!(load(&path).expect("loaded"), Some(credentials));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "{").expect("write");
        assert!(load(&path).is_err());
    }

    #[test]
    fn passwords_are_long_alphanumerics() {
        let password = random_password();
        assert_eq!(password.len(), 20);
        assert!(password.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
