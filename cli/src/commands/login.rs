//! `usher login`, `usher logout` and `usher whoami`: the session stored in a
//! profile of the config file.

use std::io::{BufRead, IsTerminal};

use anyhow::Context as _;
use usher_proto::identity::v1::{
    GetCurrentUserRequest, SignInRequest, SignOutRequest, auth_service_client::AuthServiceClient,
    sign_in_request::Login,
};

use crate::{
    client::Client,
    config::Profile,
    output::{self, line, note},
    rpc,
};

/// `usher login`.
#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The account's slug.
    #[arg(long, env = "USHER_CLI_ACCOUNT")]
    pub account: String,
    /// The email to sign in with.
    #[arg(
        long,
        conflicts_with = "username",
        required_unless_present = "username"
    )]
    pub email: Option<String>,
    /// The username to sign in with (directly created users).
    #[arg(long)]
    pub username: Option<String>,
    /// Read the password from the first line of standard input instead of
    /// prompting for it.
    #[arg(long)]
    pub password_stdin: bool,
}

/// Signs in and stores the session in the profile.
pub async fn login(client: &mut Client, args: LoginArgs) -> anyhow::Result<()> {
    let password = if args.password_stdin {
        read_password_line(std::io::stdin().lock())?
    } else {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("no terminal to ask for the password: use --password-stdin");
        }
        rpassword::prompt_password("Password: ").context("reading the password")?
    };
    let (login, shown) = match (args.email, args.username) {
        (Some(email), _) => (Login::Email(email.clone()), email),
        (None, Some(username)) => (Login::Username(username.clone()), username),
        (None, None) => anyhow::bail!("give --email or --username"),
    };
    let request = SignInRequest {
        account_slug: args.account.clone(),
        login: Some(login),
        password,
    };
    let response = client
        .call_public(|channel, auth| async move {
            AuthServiceClient::new(channel)
                .sign_in(auth.request(request))
                .await
        })
        .await
        .context("signing in")?;
    let session = response
        .session
        .context("the gateway answered without a session")?;
    let profile = Profile {
        gateway: client.gateway().to_owned(),
        account: args.account.clone(),
        login: shown.clone(),
        access_token: session.access_token,
        refresh_token: session.refresh_token,
    };
    client.save_profile(profile)?;
    note(format!(
        "Signed in to {} as {shown} on {} (profile {:?}, saved in {}).",
        args.account,
        client.gateway(),
        client.profile_name(),
        client.config_path().display()
    ));
    if session.password_change_required {
        note("This account must change its password before doing anything else.");
    }
    Ok(())
}

/// Reads a password from the first line of `input`, without its line break.
pub fn read_password_line(mut input: impl BufRead) -> anyhow::Result<String> {
    let mut password = String::new();
    input
        .read_line(&mut password)
        .context("reading the password from standard input")?;
    let password = password.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        anyhow::bail!("no password on standard input");
    }
    Ok(password)
}

/// Signs out (revoking the session) and forgets it.
pub async fn logout(client: &mut Client, all_sessions: bool) -> anyhow::Result<()> {
    if !client.profile().signed_in() {
        note(format!(
            "Profile {:?} is not signed in.",
            client.profile_name()
        ));
        return Ok(());
    }
    let revoked = rpc!(
        client,
        AuthServiceClient,
        sign_out,
        SignOutRequest { all_sessions }
    );
    if let Err(error) = &revoked {
        note(format!(
            "The gateway did not confirm the sign-out ({error:#}); forgetting the session anyway."
        ));
    }
    let mut profile = client.profile().clone();
    profile.access_token.clear();
    profile.refresh_token.clear();
    client.save_profile(profile)?;
    note(format!("Signed out (profile {:?}).", client.profile_name()));
    Ok(())
}

/// Shows who the credential belongs to.
pub async fn whoami(client: &mut Client) -> anyhow::Result<()> {
    let me = rpc!(
        client,
        AuthServiceClient,
        get_current_user,
        GetCurrentUserRequest {}
    )?;
    if client.json {
        return output::json("usher.identity.v1.GetCurrentUserResponse", &me);
    }
    let account = me.account.unwrap_or_default();
    match me.user {
        Some(user) => line(format!(
            "{} <{}> in {} ({}), role {}",
            user.display_name, user.email, account.name, account.slug, user.role_name
        )),
        None => line(format!(
            "API key {} of {} ({})",
            me.api_key_id, account.name, account.slug
        )),
    }
    line(format!("permissions: {}", me.permissions.join(", ")));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_the_first_line_without_its_break() {
        let read = read_password_line("s3cret pass\r\nnext\n".as_bytes()).expect("read");
        assert_eq!(read, "s3cret pass");
        assert!(read_password_line("".as_bytes()).is_err());
        assert!(read_password_line("\n".as_bytes()).is_err());
    }
}
