//! The connection to a gateway and the credential of each call: the session
//! of the chosen profile (refreshed once when the access token has expired),
//! or a token given with `--token` / `USHER_TOKEN` (an API key or an access
//! token, never stored).

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};
use usher_proto::identity::v1::{RefreshSessionRequest, auth_service_client::AuthServiceClient};

use crate::{
    config::{self, DEFAULT_GATEWAY, DEFAULT_PROFILE, Profile},
    error::CallError,
};

/// The options every client command shares.
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalArgs {
    /// The gateway's URL (default: the profile's, else http://127.0.0.1:8080).
    #[arg(long, global = true, env = "USHER_CLI_GATEWAY")]
    pub gateway: Option<String>,
    /// The profile of the config file to use.
    #[arg(long, global = true, env = "USHER_CLI_PROFILE", default_value = DEFAULT_PROFILE)]
    pub profile: String,
    /// A bearer credential (account API key or access token) to use instead
    /// of the profile's session.
    #[arg(long, global = true, env = "USHER_CLI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's responses as JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The bearer credential of one call.
#[derive(Debug, Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Auth {
    /// A header value for `token`; refused when it is not printable ASCII.
    pub fn bearer(token: &str) -> anyhow::Result<Self> {
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .context("the token has characters a header cannot carry")?;
        Ok(Self(Some(value)))
    }

    /// No credential (public RPCs).
    pub fn none() -> Self {
        Self(None)
    }

    /// `message` carrying this credential.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }
}

/// A gateway, a profile and the way calls authenticate.
#[derive(Debug)]
pub struct Client {
    config_path: PathBuf,
    profile_name: String,
    profile: Profile,
    token_override: Option<String>,
    gateway: String,
    channel: Channel,
    /// `--json`.
    pub json: bool,
}

impl Client {
    /// Loads the profile and prepares (lazily) the connection.
    pub fn new(args: &GlobalArgs) -> anyhow::Result<Self> {
        let config_path = config::default_path(|name| std::env::var(name).ok())?;
        let file = config::load(&config_path)?;
        let profile = file
            .profiles
            .get(&args.profile)
            .cloned()
            .unwrap_or_default();
        let gateway = args
            .gateway
            .clone()
            .filter(|g| !g.is_empty())
            .or_else(|| Some(profile.gateway.clone()).filter(|g| !g.is_empty()))
            .unwrap_or_else(|| DEFAULT_GATEWAY.to_owned());
        let channel = channel(&gateway)?;
        Ok(Self {
            config_path,
            profile_name: args.profile.clone(),
            profile,
            token_override: args.token.clone().filter(|t| !t.is_empty()),
            gateway,
            channel,
            json: args.json,
        })
    }

    /// The gateway's URL.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// The profile's name.
    pub fn profile_name(&self) -> &str {
        &self.profile_name
    }

    /// The profile as loaded (or as last saved).
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// A channel to the gateway.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Replaces the profile in the config file (other profiles are kept).
    pub fn save_profile(&mut self, profile: Profile) -> anyhow::Result<()> {
        let mut file = config::load(&self.config_path)?;
        file.profiles
            .insert(self.profile_name.clone(), profile.clone());
        config::save(&self.config_path, &file)?;
        self.profile = profile;
        Ok(())
    }

    /// Where the config file is.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    fn auth(&self) -> anyhow::Result<Auth> {
        if let Some(token) = &self.token_override {
            return Auth::bearer(token);
        }
        if !self.profile.signed_in() {
            anyhow::bail!(
                "not signed in (profile {:?}): run `usher login`, or pass --token",
                self.profile_name
            );
        }
        Auth::bearer(&self.profile.access_token)
    }

    /// Runs `call` with the credential; when the session's access token is
    /// refused as expired, refreshes the session once and runs it again.
    pub async fn call<T, F, Fut>(&mut self, mut call: F) -> anyhow::Result<T>
    where
        F: FnMut(Channel, Auth) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let first = call(self.channel.clone(), self.auth()?).await;
        match first {
            Ok(response) => Ok(response.into_inner()),
            Err(status) if status.code() == tonic::Code::Unauthenticated && self.can_refresh() => {
                self.refresh().await?;
                call(self.channel.clone(), self.auth()?)
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| CallError::from(s).into())
            }
            Err(status) => Err(CallError::from(status).into()),
        }
    }

    /// Runs a public call, without credential.
    pub async fn call_public<T, F, Fut>(&self, call: F) -> anyhow::Result<T>
    where
        F: FnOnce(Channel, Auth) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        call(self.channel.clone(), Auth::none())
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| CallError::from(s).into())
    }

    fn can_refresh(&self) -> bool {
        self.token_override.is_none() && !self.profile.refresh_token.is_empty()
    }

    async fn refresh(&mut self) -> anyhow::Result<()> {
        let refreshed = AuthServiceClient::new(self.channel.clone())
            .refresh_session(RefreshSessionRequest {
                refresh_token: self.profile.refresh_token.clone(),
            })
            .await
            .map_err(|status| {
                anyhow::Error::from(CallError::from(status))
                    .context("the session has expired: run `usher login` again")
            })?
            .into_inner();
        let session = refreshed
            .session
            .context("the gateway answered a refresh without a session")?;
        let mut profile = self.profile.clone();
        profile.access_token = session.access_token;
        if !session.refresh_token.is_empty() {
            profile.refresh_token = session.refresh_token;
        }
        self.save_profile(profile)
    }
}

/// A lazily connected channel to `gateway` (`http://` or `https://`).
pub fn channel(gateway: &str) -> anyhow::Result<Channel> {
    let url = url::Url::parse(gateway)
        .with_context(|| format!("{gateway:?} is not a URL (e.g. http://127.0.0.1:8080)"))?;
    let mut endpoint = Endpoint::from_shared(gateway.to_owned())
        .with_context(|| format!("{gateway:?} is not a gateway URL"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60));
    match url.scheme() {
        "http" => {}
        "https" => {
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().with_webpki_roots())
                .context("TLS setup")?;
        }
        other => anyhow::bail!("the gateway URL must be http:// or https://, not {other}://"),
    }
    Ok(endpoint.connect_lazy())
}

/// Calls `$method` of `$client` through `$ctx` with `$request` (cloned for a
/// retry after a session refresh).
#[macro_export]
macro_rules! rpc {
    ($ctx:expr, $client:ident, $method:ident, $request:expr) => {{
        let request = $request;
        $ctx.call(move |channel, auth| {
            let request = request.clone();
            async move { $client::new(channel).$method(auth.request(request)).await }
        })
        .await
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn gateway_urls_are_checked() {
        assert!(channel("http://127.0.0.1:8080").is_ok());
        assert!(channel("https://usher.example.com").is_ok());
        let error = channel("ftp://x").expect_err("bad scheme");
        assert!(error.to_string().contains("http:// or https://"), "{error}");
        assert!(channel("not a url").is_err());
    }

    #[test]
    fn the_bearer_header_is_set_only_with_a_token() {
        let with = Auth::bearer("abc").expect("ascii").request(());
        assert_eq!(
            with.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer abc")
        );
        let without = Auth::none().request(());
        assert!(without.metadata().get("authorization").is_none());
        assert!(Auth::bearer("line\nbreak").is_err());
    }
}
