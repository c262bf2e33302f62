//! Roles, teams and products named on the command line by name or by id.

use usher_proto::identity::v1::{
    GetAccountRequest, ListRolesRequest, ListTeamsRequest, Role, Team,
    account_service_client::AccountServiceClient, role_service_client::RoleServiceClient,
    team_service_client::TeamServiceClient,
};

use crate::{client::Client, rpc};

/// Whether `text` is a UUID (an id rather than a name).
pub fn is_id(text: &str) -> bool {
    uuid::Uuid::parse_str(text).is_ok()
}

/// Finds `wanted` among `(id, name)` pairs: by id, else by exact name, else
/// by case-insensitive name (when that is unambiguous).
pub fn pick<'a>(
    kind: &str,
    wanted: &str,
    items: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
) -> anyhow::Result<String> {
    if let Some((id, _)) = items.clone().into_iter().find(|(id, _)| *id == wanted) {
        return Ok(id.to_owned());
    }
    if let Some((id, _)) = items.clone().into_iter().find(|(_, name)| *name == wanted) {
        return Ok(id.to_owned());
    }
    let folded: Vec<_> = items
        .clone()
        .into_iter()
        .filter(|(_, name)| name.to_lowercase() == wanted.to_lowercase())
        .collect();
    match folded.as_slice() {
        [(id, _)] => Ok((*id).to_owned()),
        [] => {
            let known: Vec<&str> = items.into_iter().map(|(_, name)| name).collect();
            anyhow::bail!(
                "no {kind} named {wanted:?} (known: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )
        }
        _ => anyhow::bail!("several {kind}s are named like {wanted:?}: give its id"),
    }
}

/// Every role of the account.
pub async fn roles(client: &mut Client) -> anyhow::Result<Vec<Role>> {
    let mut roles = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = rpc!(
            client,
            RoleServiceClient,
            list_roles,
            ListRolesRequest {
                page_size: 500,
                page_token: page_token.clone(),
            }
        )?;
        roles.extend(page.roles);
        if page.next_page_token.is_empty() {
            return Ok(roles);
        }
        page_token = page.next_page_token;
    }
}

/// Every team of the account.
pub async fn teams(client: &mut Client, query: &str) -> anyhow::Result<Vec<Team>> {
    let mut teams = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = rpc!(
            client,
            TeamServiceClient,
            list_teams,
            ListTeamsRequest {
                page_size: 500,
                page_token: page_token.clone(),
                query: query.to_owned(),
            }
        )?;
        teams.extend(page.teams);
        if page.next_page_token.is_empty() {
            return Ok(teams);
        }
        page_token = page.next_page_token;
    }
}

/// The id of the role named (or identified by) `wanted`.
pub async fn role_id(client: &mut Client, wanted: &str) -> anyhow::Result<String> {
    if is_id(wanted) {
        return Ok(wanted.to_owned());
    }
    let roles = roles(client).await?;
    pick(
        "role",
        wanted,
        roles.iter().map(|r| (r.id.as_str(), r.name.as_str())),
    )
}

/// The id of the team named (or identified by) `wanted`.
pub async fn team_id(client: &mut Client, wanted: &str) -> anyhow::Result<String> {
    if is_id(wanted) {
        return Ok(wanted.to_owned());
    }
    let teams = teams(client, "").await?;
    pick(
        "team",
        wanted,
        teams.iter().map(|t| (t.id.as_str(), t.name.as_str())),
    )
}

/// The codes of the products named (by code or display name) in `wanted`,
/// among those enabled on the account.
pub async fn product_codes(client: &mut Client, wanted: &[String]) -> anyhow::Result<Vec<String>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let account = rpc!(
        client,
        AccountServiceClient,
        get_account,
        GetAccountRequest {}
    )?;
    wanted
        .iter()
        .map(|w| {
            pick(
                "product enabled on the account",
                w,
                account
                    .products
                    .iter()
                    .map(|p| (p.code.as_str(), p.display_name.as_str())),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: [(&str, &str); 3] = [
        ("11111111-1111-1111-1111-111111111111", "Admin"),
        ("22222222-2222-2222-2222-222222222222", "User"),
        ("33333333-3333-3333-3333-333333333333", "Support"),
    ];

    #[test]
    fn picks_by_id_exact_name_then_folded_name() {
        assert_eq!(
            pick("role", "User", ROLES).expect("exact"),
            "22222222-2222-2222-2222-222222222222"
        );
        assert_eq!(
            pick("role", "support", ROLES).expect("folded"),
            "33333333-3333-3333-3333-333333333333"
        );
        assert_eq!(
            pick("role", "11111111-1111-1111-1111-111111111111", ROLES).expect("id"),
            "11111111-1111-1111-1111-111111111111"
        );
    }

    #[test]
    fn an_unknown_name_lists_the_known_ones() {
        let error = pick("role", "Owner", ROLES).expect_err("unknown");
        assert_eq!(
            error.to_string(),
            "no role named \"Owner\" (known: Admin, User, Support)"
        );
        let error = pick("team", "x", []).expect_err("none");
        assert!(error.to_string().contains("known: none"));
    }

    #[test]
    fn an_ambiguous_folded_name_asks_for_the_id() {
        let items = [("a", "Sales"), ("b", "SALES")];
        assert!(pick("team", "sales", items).is_err());
        assert_eq!(pick("team", "SALES", items).expect("exact wins"), "b");
    }

    #[test]
    fn ids_are_uuids() {
        assert!(is_id("22222222-2222-2222-2222-222222222222"));
        assert!(!is_id("User"));
    }
}
