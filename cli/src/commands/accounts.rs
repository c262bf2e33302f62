//! `usher accounts create`: what the embedding platform's back end does when
//! a customer signs up, with a platform API key (`usher platform-keys
//! create`), through the gateway.

use std::io::IsTerminal;

use anyhow::Context as _;
use usher_proto::identity::v1::{
    CreateAccountRequest, account_service_client::AccountServiceClient,
};

use crate::{
    client::{Auth, Client},
    commands::login::read_password_line,
    error::CallError,
    output::{self, line},
};

/// `usher accounts`.
#[derive(Debug, clap::Subcommand)]
pub enum AccountsCommand {
    /// Create an account and its owner.
    Create(CreateArgs),
}

/// `usher accounts create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The platform API key's secret.
    #[arg(long, env = "USHER_CLI_PLATFORM_KEY", hide_env_values = true)]
    pub platform_key: String,
    /// The account's name.
    #[arg(long)]
    pub name: String,
    /// The account's unique handle (3..63 of `[a-z0-9-]`), used to sign in.
    #[arg(long)]
    pub slug: String,
    /// The owner's email.
    #[arg(long)]
    pub owner_email: String,
    /// The owner's display name.
    #[arg(long)]
    pub owner_name: String,
    /// Read the owner's password from standard input instead of prompting.
    #[arg(long)]
    pub owner_password_stdin: bool,
    /// Seat limit (1 = single-user plan).
    #[arg(long, default_value_t = 10)]
    pub seats: i32,
    /// A product code to enable; repeat for several.
    #[arg(long = "product")]
    pub products: Vec<String>,
    /// Default locale (`en`, `fr`).
    #[arg(long, default_value = "")]
    pub locale: String,
}

/// Runs an `accounts` subcommand.
pub async fn run(client: &mut Client, command: AccountsCommand) -> anyhow::Result<()> {
    let AccountsCommand::Create(args) = command;
    let password = if args.owner_password_stdin {
        read_password_line(std::io::stdin().lock())?
    } else {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("no terminal to ask for the password: use --owner-password-stdin");
        }
        rpassword::prompt_password("Owner's password: ").context("reading the password")?
    };
    let auth = Auth::bearer(&args.platform_key)?;
    let request = CreateAccountRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        name: args.name,
        slug: args.slug,
        default_locale: args.locale,
        owner_email: args.owner_email,
        owner_display_name: args.owner_name,
        owner_password: password,
        seat_limit: args.seats,
        products: args.products,
        ..Default::default()
    };
    let created = AccountServiceClient::new(client.channel())
        .create_account(auth.request(request))
        .await
        .map_err(CallError::from)?
        .into_inner();
    if client.json {
        return output::json("usher.identity.v1.CreateAccountResponse", &created);
    }
    let account = created.account.unwrap_or_default();
    let owner = created.owner.unwrap_or_default();
    line(format!(
        "Created account {} ({}, id {}) owned by {} <{}>.",
        account.name, account.slug, account.id, owner.display_name, owner.email
    ));
    line(format!(
        "Sign in: usher login --gateway {} --account {} --email {}",
        client.gateway(),
        account.slug,
        owner.email
    ));
    Ok(())
}
