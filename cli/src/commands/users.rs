//! `usher users list|search|show|update|deactivate|reactivate|delete`.

use std::io::IsTerminal;

use anyhow::Context as _;
use usher_proto::identity::v1::{
    DeactivateUserRequest, DeleteUserRequest, GetUserRequest, ListUsersRequest, ListUsersResponse,
    ReactivateUserRequest, UpdateUserRequest, User, UserOrderBy, UserStatus,
    user_service_client::UserServiceClient,
};

use crate::{
    client::Client,
    commands::resolve,
    output::{self, enum_name, line, note},
    rpc,
};

/// `usher users`.
#[derive(Debug, clap::Subcommand)]
pub enum UsersCommand {
    /// List the account's users (the owner first).
    List(ListArgs),
    /// Search users by a part of their name, email or username.
    Search {
        /// 3..200 characters, case-insensitive.
        query: String,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one user, by id or email.
    Show {
        /// The user's id, email or username.
        user: String,
    },
    /// Change a user's name, role, team, products or locale.
    Update(UpdateArgs),
    /// Deactivate an active user (sessions end, seat freed).
    Deactivate {
        /// The user's id, email or username.
        user: String,
    },
    /// Reactivate an inactive user.
    Reactivate {
        /// The user's id, email or username.
        user: String,
    },
    /// Delete an active or inactive user.
    Delete {
        /// The user's id, email or username.
        user: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// Filters and paging of `users list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Only users in this status.
    #[arg(long, value_enum)]
    pub status: Option<StatusArg>,
    /// Only users with this role (name or id).
    #[arg(long)]
    pub role: Option<String>,
    /// Only users in this team (name or id).
    #[arg(long)]
    pub team: Option<String>,
    /// The order.
    #[arg(long, value_enum, default_value_t = OrderArg::Name)]
    pub order: OrderArg,
    /// Most users to show (pages are fetched as needed).
    #[arg(long, default_value_t = 50, conflicts_with = "all")]
    pub limit: usize,
    /// Show every user.
    #[arg(long)]
    pub all: bool,
}

/// A user status on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusArg {
    /// Invited, not yet accepted.
    Invited,
    /// Active members.
    Active,
    /// Deactivated members.
    Inactive,
}

impl From<StatusArg> for UserStatus {
    fn from(status: StatusArg) -> Self {
        match status {
            StatusArg::Invited => Self::Invited,
            StatusArg::Active => Self::Active,
            StatusArg::Inactive => Self::Inactive,
        }
    }
}

/// A user order on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OrderArg {
    /// Display name, A to Z.
    Name,
    /// Email, A to Z.
    Email,
    /// Newest first.
    Created,
}

impl From<OrderArg> for UserOrderBy {
    fn from(order: OrderArg) -> Self {
        match order {
            OrderArg::Name => Self::DisplayName,
            OrderArg::Email => Self::Email,
            OrderArg::Created => Self::CreateTimeDesc,
        }
    }
}

/// `usher users update`.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// The user's id, email or username.
    pub user: String,
    /// New display name.
    #[arg(long)]
    pub name: Option<String>,
    /// New role (name or id).
    #[arg(long)]
    pub role: Option<String>,
    /// New team (name or id).
    #[arg(long, conflicts_with = "no_team")]
    pub team: Option<String>,
    /// Remove the user from its team.
    #[arg(long)]
    pub no_team: bool,
    /// Product grants, replacing the old ones (code or name); repeat for
    /// several.
    #[arg(long = "product")]
    pub products: Vec<String>,
    /// Remove every product grant.
    #[arg(long, conflicts_with = "products")]
    pub no_products: bool,
    /// New locale (`en`, `fr`; empty for the account default).
    #[arg(long)]
    pub locale: Option<String>,
}

/// Runs a `users` subcommand.
pub async fn run(client: &mut Client, command: UsersCommand) -> anyhow::Result<()> {
    match command {
        UsersCommand::List(args) => list(client, args, String::new()).await,
        UsersCommand::Search { query, list: args } => list(client, args, query).await,
        UsersCommand::Show { user } => {
            let user = find(client, &user).await?;
            show_one(client.json, &user)
        }
        UsersCommand::Update(args) => update(client, args).await,
        UsersCommand::Deactivate { user } => {
            let user_id = find(client, &user).await?.id;
            let done = rpc!(
                client,
                UserServiceClient,
                deactivate_user,
                DeactivateUserRequest { user_id }
            )?;
            show_one(client.json, &done.user.unwrap_or_default())
        }
        UsersCommand::Reactivate { user } => {
            let user_id = find(client, &user).await?.id;
            let done = rpc!(
                client,
                UserServiceClient,
                reactivate_user,
                ReactivateUserRequest { user_id }
            )?;
            show_one(client.json, &done.user.unwrap_or_default())
        }
        UsersCommand::Delete { user, yes } => {
            let user = find(client, &user).await?;
            confirm(yes, &format!("Delete {} ({})?", label(&user), user.id))?;
            let done = rpc!(
                client,
                UserServiceClient,
                delete_user,
                DeleteUserRequest {
                    user_id: user.id.clone()
                }
            )?;
            if client.json {
                return output::json("usher.identity.v1.DeleteUserResponse", &done);
            }
            line(format!("Deleted {} ({}).", label(&user), done.user_id));
            Ok(())
        }
    }
}

/// Asks `question` on the terminal unless `yes`; without a terminal, `--yes`
/// is required.
pub fn confirm(yes: bool, question: &str) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{question} Pass --yes to confirm without a terminal.");
    }
    note(format!("{question} [y/N]"));
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("reading the answer")?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        anyhow::bail!("cancelled")
    }
}

async fn list(client: &mut Client, args: ListArgs, query: String) -> anyhow::Result<()> {
    let role_id = match &args.role {
        Some(role) => resolve::role_id(client, role).await?,
        None => String::new(),
    };
    let team_id = match &args.team {
        Some(team) => resolve::team_id(client, team).await?,
        None => String::new(),
    };
    let limit = if args.all { usize::MAX } else { args.limit };
    let mut shown = ListUsersResponse::default();
    let mut page_token = String::new();
    loop {
        let wanted = limit.saturating_sub(shown.users.len()).clamp(1, 500);
        let page = rpc!(
            client,
            UserServiceClient,
            list_users,
            ListUsersRequest {
                page_size: i32::try_from(wanted).unwrap_or(500),
                page_token: page_token.clone(),
                status: args.status.map_or(0, |s| UserStatus::from(s) as i32),
                role_id: role_id.clone(),
                team_id: team_id.clone(),
                query: query.clone(),
                order_by: UserOrderBy::from(args.order) as i32,
            }
        )?;
        shown.users.extend(page.users);
        shown.total_size = page.total_size;
        shown.total_size_capped = page.total_size_capped;
        shown.next_page_token = page.next_page_token;
        if shown.next_page_token.is_empty() || shown.users.len() >= limit {
            break;
        }
        page_token = shown.next_page_token.clone();
    }
    shown.users.truncate(limit);
    if client.json {
        return output::json("usher.identity.v1.ListUsersResponse", &shown);
    }
    line(output::table(
        &["ID", "EMAIL / USERNAME", "NAME", "STATUS", "ROLE", "TEAM"],
        shown.users.iter().map(row),
    ));
    line(output::count_line(
        shown.users.len(),
        shown.total_size,
        shown.total_size_capped,
        "user",
    ));
    Ok(())
}

/// The short status name, e.g. `ACTIVE`.
pub fn status_name(status: i32) -> String {
    UserStatus::try_from(status).map_or_else(
        |_| format!("status {status}"),
        |s| enum_name(s.as_str_name(), "USER_STATUS_"),
    )
}

/// The email, else the username.
pub fn label(user: &User) -> &str {
    if user.email.is_empty() {
        &user.username
    } else {
        &user.email
    }
}

/// One row of the users table.
pub fn row(user: &User) -> Vec<String> {
    let name = if user.owner {
        format!("{} (owner)", user.display_name)
    } else {
        user.display_name.clone()
    };
    vec![
        user.id.clone(),
        label(user).to_owned(),
        name,
        status_name(user.status),
        user.role_name.clone(),
        user.team_name.clone(),
    ]
}

fn show_one(json: bool, user: &User) -> anyhow::Result<()> {
    if json {
        return output::json("usher.identity.v1.User", user);
    }
    let fields = [
        ("id", user.id.clone()),
        ("email", user.email.clone()),
        ("username", user.username.clone()),
        ("name", user.display_name.clone()),
        ("status", status_name(user.status)),
        ("owner", user.owner.to_string()),
        ("role", format!("{} ({})", user.role_name, user.role_id)),
        ("team", user.team_name.clone()),
        ("products", user.products.join(", ")),
        ("locale", user.locale.clone()),
        ("created", output::time(user.create_time.as_ref())),
        ("activated", output::time(user.activate_time.as_ref())),
        ("deactivated", output::time(user.deactivate_time.as_ref())),
        (
            "last sign-in",
            output::time(user.last_sign_in_time.as_ref()),
        ),
    ];
    for (name, value) in fields {
        line(format!("{name:>13}: {value}"));
    }
    Ok(())
}

/// The user named by id, email or username.
pub async fn find(client: &mut Client, wanted: &str) -> anyhow::Result<User> {
    if resolve::is_id(wanted) {
        let found = rpc!(
            client,
            UserServiceClient,
            get_user,
            GetUserRequest {
                user_id: wanted.to_owned()
            }
        )?;
        return found.user.context("the gateway answered without a user");
    }
    if wanted.chars().count() < 3 {
        anyhow::bail!("give the user's id, email or username (at least 3 characters)");
    }
    let found = rpc!(
        client,
        UserServiceClient,
        list_users,
        ListUsersRequest {
            page_size: 500,
            query: wanted.to_owned(),
            ..Default::default()
        }
    )?;
    let folded = wanted.to_lowercase();
    found
        .users
        .into_iter()
        .find(|u| u.email.to_lowercase() == folded || u.username.to_lowercase() == folded)
        .with_context(|| format!("no user with the email or username {wanted:?}"))
}

async fn update(client: &mut Client, args: UpdateArgs) -> anyhow::Result<()> {
    let user_id = find(client, &args.user).await?.id;
    let mut request = UpdateUserRequest {
        user_id,
        ..Default::default()
    };
    let mut paths = Vec::new();
    if let Some(name) = args.name {
        request.display_name = name;
        paths.push("display_name");
    }
    if let Some(role) = args.role {
        request.role_id = resolve::role_id(client, &role).await?;
        paths.push("role_id");
    }
    if let Some(team) = args.team {
        request.team_id = resolve::team_id(client, &team).await?;
        paths.push("team_id");
    } else if args.no_team {
        paths.push("team_id");
    }
    if !args.products.is_empty() {
        request.products = resolve::product_codes(client, &args.products).await?;
        paths.push("products");
    } else if args.no_products {
        paths.push("products");
    }
    if let Some(locale) = args.locale {
        request.locale = locale;
        paths.push("locale");
    }
    if paths.is_empty() {
        anyhow::bail!(
            "nothing to change: give --name, --role, --team, --no-team, --product, --no-products or --locale"
        );
    }
    request.update_mask = Some(prost_types::FieldMask {
        paths: paths.into_iter().map(str::to_owned).collect(),
    });
    let done = rpc!(client, UserServiceClient, update_user, request)?;
    show_one(client.json, &done.user.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_show_the_owner_and_short_status() {
        let user = User {
            id: "u1".into(),
            username: "kiosk-1".into(),
            display_name: "Kiosk".into(),
            status: UserStatus::Inactive as i32,
            role_name: "User".into(),
            owner: true,
            ..Default::default()
        };
        assert_eq!(
            row(&user),
            ["u1", "kiosk-1", "Kiosk (owner)", "INACTIVE", "User", ""]
        );
        assert_eq!(status_name(42), "status 42");
    }

    #[test]
    fn command_line_values_map_to_the_api() {
        assert_eq!(UserStatus::from(StatusArg::Active), UserStatus::Active);
        assert_eq!(
            UserOrderBy::from(OrderArg::Created),
            UserOrderBy::CreateTimeDesc
        );
    }

    #[test]
    fn the_count_line_says_when_more_matched_than_were_counted() {
        use output::count_line;
        assert_eq!(count_line(1, 1, false, "user"), "1 of 1 user");
        assert_eq!(count_line(50, 120, false, "user"), "50 of 120 users");
        assert_eq!(count_line(50, 1000, true, "user"), "50 of 1000+ users");
        assert_eq!(
            count_line(50, 1000, true, "invitation"),
            "50 of 1000+ invitations"
        );
    }

    #[test]
    fn confirmation_is_skipped_with_yes() {
        confirm(true, "Delete?").expect("--yes confirms");
    }
}
