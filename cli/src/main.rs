//! `usher`: the operator and admin command line.
//!
//! - `usher dev` runs the three services and the gateway in one process
//!   (see [`dev`]).
//! - The other commands are clients of any gateway: `login` stores a session
//!   in a profile of the config file, and `invite`, `users`, `invitations`,
//!   `roles`, `teams`, `audit` and `accounts` call the public API with it.
//!   Results are tables, or the API's JSON with `--json`; a failed call shows
//!   the gRPC code, the reason and the fields at fault, and exits with 1.
//! - `usher platform-keys create` works on identity's database directly.
//! - `usher parked list|replay` works on the notification service's
//!   RabbitMQ and database directly.

mod client;
mod commands;
mod config;
mod dev;
mod error;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{
    client::{Client, GlobalArgs},
    commands::{
        accounts::AccountsCommand, audit::AuditArgs, directory::TeamsCommand,
        invitations::InvitationsCommand, invite::InviteArgs, login::LoginArgs, users::UsersCommand,
    },
};

#[derive(Debug, Parser)]
#[command(
    name = "usher",
    version,
    about = "Usher: invitations and user management",
    after_help = "Start with `usher dev`, then `usher login` in another terminal. See docs/cli.md."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every service and the gateway in this process, with a demo account.
    Dev(dev::DevArgs),
    /// Sign in and store the session in a profile.
    Login(LoginArgs),
    /// Sign out and forget the profile's session.
    Logout {
        /// Revoke every session of the user, not only this one.
        #[arg(long)]
        all: bool,
    },
    /// Show who the current credential belongs to.
    Whoami,
    /// Invite people by email.
    Invite(InviteArgs),
    /// List, search, show, update, deactivate, reactivate and delete users.
    #[command(subcommand)]
    Users(UsersCommand),
    /// List, resend, revoke and delete invitations.
    #[command(subcommand)]
    Invitations(InvitationsCommand),
    /// List the account's roles.
    Roles,
    /// List or create teams.
    Teams {
        #[command(subcommand)]
        command: Option<TeamsCommand>,
    },
    /// Read the account's audit log.
    Audit(AuditArgs),
    /// Accounts, with a platform API key.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Platform API keys (for the embedding platform's back end).
    #[command(subcommand)]
    PlatformKeys(PlatformKeys),
    /// Look at the email jobs the notification service parked, and replay them.
    #[command(subcommand)]
    Parked(Parked),
}

#[derive(Debug, Subcommand)]
enum Parked {
    /// List the parked jobs with why each was parked (they stay parked).
    List {
        /// The notification service's configuration file (`USHER_*` variables apply too).
        #[arg(long, env = "USHER_CONFIG")]
        config: Option<std::path::PathBuf>,
    },
    /// Put parked jobs back to work (their delivery set back to QUEUED), once
    /// the cause is fixed; the others stay parked.
    Replay {
        /// A job id to replay (repeat for several).
        #[arg(long = "job", required_unless_present = "all", conflicts_with = "all")]
        jobs: Vec<String>,
        /// Replay every parked job that names a job id.
        #[arg(long)]
        all: bool,
        /// The notification service's configuration file (`USHER_*` variables apply too).
        #[arg(long, env = "USHER_CONFIG")]
        config: Option<std::path::PathBuf>,
    },
}

impl Parked {
    fn into_parts(
        self,
    ) -> (
        Option<std::path::PathBuf>,
        usher_notification::parked::Replay,
    ) {
        use usher_notification::parked::Replay;
        match self {
            Self::List { config } => (config, Replay::Nothing),
            Self::Replay {
                all: true, config, ..
            } => (config, Replay::All),
            Self::Replay { jobs, config, .. } => (config, Replay::Jobs(jobs.into_iter().collect())),
        }
    }
}

#[derive(Debug, Subcommand)]
enum PlatformKeys {
    /// Create a platform key and print its secret once.
    Create {
        /// A name telling operators what the key is for.
        #[arg(long)]
        name: String,
        /// The identity service's configuration file (`USHER_*` variables apply too).
        #[arg(long, env = "USHER_CONFIG")]
        config: Option<std::path::PathBuf>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            output::note(format!("usher: {err:#}"));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = match cli.command {
        Command::Dev(args) => return dev::run(args).await,
        Command::PlatformKeys(PlatformKeys::Create { name, config }) => {
            return commands::platform_keys::create(config.as_deref(), &name).await;
        }
        Command::Parked(parked) => {
            let (config, replay) = parked.into_parts();
            return commands::parked::run(config.as_deref(), replay, cli.global.json).await;
        }
        other => other,
    };
    let mut client = Client::new(&cli.global)?;
    match command {
        Command::Login(args) => commands::login::login(&mut client, args).await,
        Command::Logout { all } => commands::login::logout(&mut client, all).await,
        Command::Whoami => commands::login::whoami(&mut client).await,
        Command::Invite(args) => commands::invite::invite(&mut client, args).await,
        Command::Users(command) => commands::users::run(&mut client, command).await,
        Command::Invitations(command) => commands::invitations::run(&mut client, command).await,
        Command::Roles => commands::directory::roles(&mut client).await,
        Command::Teams { command } => commands::directory::teams(&mut client, command).await,
        Command::Audit(args) => commands::audit::run(&mut client, args).await,
        Command::Accounts(command) => commands::accounts::run(&mut client, command).await,
        Command::Dev(_) | Command::PlatformKeys(_) | Command::Parked(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_anywhere() {
        let cli = Cli::try_parse_from([
            "usher",
            "users",
            "list",
            "--json",
            "--profile",
            "staging",
            "--status",
            "active",
        ])
        .expect("parsed");
        assert!(cli.global.json);
        assert_eq!(cli.global.profile, "staging");
        assert!(matches!(cli.command, Command::Users(UsersCommand::List(_))));
    }

    #[test]
    fn invite_takes_addresses_and_options() {
        let cli = Cli::try_parse_from([
            "usher",
            "invite",
            "ada@example.com",
            "Bob <bob@example.com>",
            "--role",
            "Admin",
            "--dry-run",
        ])
        .expect("parsed");
        let Command::Invite(args) = cli.command else {
            panic!("not invite")
        };
        assert_eq!(args.addresses.len(), 2);
        assert_eq!(args.role, "Admin");
        assert!(args.dry_run);
    }

    #[test]
    fn parked_replay_takes_job_ids_or_all_never_both() {
        use usher_notification::parked::Replay;
        let cli = Cli::try_parse_from(["usher", "parked", "replay", "--job", "a", "--job", "b"])
            .expect("parsed");
        let Command::Parked(parked) = cli.command else {
            panic!("not parked")
        };
        assert_eq!(
            parked.into_parts().1,
            Replay::Jobs(["a".to_owned(), "b".to_owned()].into_iter().collect())
        );
        let cli = Cli::try_parse_from(["usher", "parked", "replay", "--all"]).expect("parsed");
        let Command::Parked(parked) = cli.command else {
            panic!("not parked")
        };
        assert_eq!(parked.into_parts().1, Replay::All);
        let cli = Cli::try_parse_from(["usher", "parked", "list", "--json"]).expect("parsed");
        assert!(cli.global.json);
        let Command::Parked(parked) = cli.command else {
            panic!("not parked")
        };
        assert_eq!(parked.into_parts().1, Replay::Nothing);
        assert!(Cli::try_parse_from(["usher", "parked", "replay"]).is_err());
        assert!(Cli::try_parse_from(["usher", "parked", "replay", "--all", "--job", "a"]).is_err());
    }

    #[test]
    fn login_needs_an_email_or_a_username() {
        assert!(Cli::try_parse_from(["usher", "login", "--account", "acme"]).is_err());
        assert!(
            Cli::try_parse_from([
                "usher",
                "login",
                "--account",
                "acme",
                "--email",
                "a@b.c",
                "--username",
                "x"
            ])
            .is_err()
        );
    }
}
