//! `usher roles` and `usher teams`: what invitations and users refer to.

use usher_proto::identity::v1::{
    CreateTeamRequest, ListRolesResponse, ListTeamsResponse, Role, Team,
    team_service_client::TeamServiceClient,
};

use crate::{
    client::Client,
    commands::resolve,
    output::{self, line},
    rpc,
};

/// `usher teams`.
#[derive(Debug, clap::Subcommand)]
pub enum TeamsCommand {
    /// List the account's teams (the default).
    List {
        /// Part of the team's name (3 characters at least).
        #[arg(long, default_value = "")]
        query: String,
    },
    /// Create a team.
    Create {
        /// The team's name.
        name: String,
        /// What the team is.
        #[arg(long, default_value = "")]
        description: String,
    },
}

/// Lists the roles.
pub async fn roles(client: &mut Client) -> anyhow::Result<()> {
    let roles = resolve::roles(client).await?;
    if client.json {
        let response = ListRolesResponse {
            roles,
            next_page_token: String::new(),
        };
        return output::json("usher.identity.v1.ListRolesResponse", &response);
    }
    line(output::table(
        &["ID", "NAME", "BUILT-IN", "USERS", "PERMISSIONS"],
        roles.iter().map(role_row),
    ));
    Ok(())
}

/// One row of the roles table.
pub fn role_row(role: &Role) -> Vec<String> {
    vec![
        role.id.clone(),
        role.name.clone(),
        if role.built_in { "yes" } else { "" }.to_owned(),
        role.user_count.to_string(),
        role.permissions.join(", "),
    ]
}

/// Runs a `teams` subcommand (listing when none is given).
pub async fn teams(client: &mut Client, command: Option<TeamsCommand>) -> anyhow::Result<()> {
    match command.unwrap_or(TeamsCommand::List {
        query: String::new(),
    }) {
        TeamsCommand::List { query } => {
            let teams = resolve::teams(client, &query).await?;
            if client.json {
                let response = ListTeamsResponse {
                    total_size: i32::try_from(teams.len()).unwrap_or(i32::MAX),
                    teams,
                    next_page_token: String::new(),
                };
                return output::json("usher.identity.v1.ListTeamsResponse", &response);
            }
            line(output::table(
                &["ID", "NAME", "MEMBERS", "DESCRIPTION"],
                teams.iter().map(team_row),
            ));
            Ok(())
        }
        TeamsCommand::Create { name, description } => {
            let created = rpc!(
                client,
                TeamServiceClient,
                create_team,
                CreateTeamRequest {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    name,
                    description,
                }
            )?;
            let team = created.team.unwrap_or_default();
            if client.json {
                return output::json("usher.identity.v1.Team", &team);
            }
            line(format!("Created team {} ({}).", team.name, team.id));
            Ok(())
        }
    }
}

/// One row of the teams table.
pub fn team_row(team: &Team) -> Vec<String> {
    vec![
        team.id.clone(),
        team.name.clone(),
        team.member_count.to_string(),
        team.description.clone(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_show_roles_and_teams() {
        let role = Role {
            id: "r".into(),
            name: "Admin".into(),
            built_in: true,
            user_count: 2,
            permissions: vec!["users.read".into(), "users.invite".into()],
            ..Default::default()
        };
        assert_eq!(
            role_row(&role),
            ["r", "Admin", "yes", "2", "users.read, users.invite"]
        );
        let team = Team {
            id: "t".into(),
            name: "Sales".into(),
            member_count: 3,
            ..Default::default()
        };
        assert_eq!(team_row(&team), ["t", "Sales", "3", ""]);
    }
}
