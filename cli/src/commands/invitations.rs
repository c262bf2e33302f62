//! `usher invitations list|resend|revoke|delete`.

use usher_proto::invitation::v1::{
    DeleteInvitationsRequest, Invitation, InvitationOrderBy, InvitationResult, InvitationState,
    ListInvitationsRequest, ListInvitationsResponse, ResendInvitationsRequest,
    RevokeInvitationsRequest, invitation_service_client::InvitationServiceClient,
};

use crate::{
    client::Client,
    commands::users::confirm,
    output::{self, enum_name, line},
    rpc,
};

/// Most ids in one call.
const MAX_IDS: usize = 1_000;

/// `usher invitations`.
#[derive(Debug, clap::Subcommand)]
pub enum InvitationsCommand {
    /// List invitations, newest first.
    List(ListArgs),
    /// Send a new link (earlier links stop working).
    Resend {
        /// Invitation ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Withdraw invitations (the link stops working, the seat is freed).
    Revoke {
        /// Invitation ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Delete invitation records (pending ones are revoked first).
    Delete {
        /// Invitation ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// Filters and paging of `invitations list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only invitations in this state; repeat for several.
    #[arg(long = "state", value_enum)]
    pub states: Vec<StateArg>,
    /// Part of the invited email (3 characters at least).
    #[arg(long, default_value = "")]
    pub query: String,
    /// Most invitations to show.
    #[arg(long, default_value_t = 50, conflicts_with = "all")]
    pub limit: usize,
    /// Show every invitation.
    #[arg(long)]
    pub all: bool,
}

/// An invitation state on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateArg {
    /// The link works.
    Pending,
    /// Being accepted right now.
    Accepting,
    /// Accepted.
    Accepted,
    /// The link expired.
    Expired,
    /// Withdrawn.
    Revoked,
    /// Declined by the invitee.
    Declined,
}

impl From<StateArg> for InvitationState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Pending => Self::Pending,
            StateArg::Accepting => Self::Accepting,
            StateArg::Accepted => Self::Accepted,
            StateArg::Expired => Self::Expired,
            StateArg::Revoked => Self::Revoked,
            StateArg::Declined => Self::Declined,
        }
    }
}

/// Runs an `invitations` subcommand.
pub async fn run(client: &mut Client, command: InvitationsCommand) -> anyhow::Result<()> {
    match command {
        InvitationsCommand::List(args) => list(client, args).await,
        InvitationsCommand::Resend { ids } => {
            let mut results = Vec::new();
            for chunk in ids.chunks(MAX_IDS) {
                let done = rpc!(
                    client,
                    InvitationServiceClient,
                    resend_invitations,
                    ResendInvitationsRequest {
                        request_id: uuid::Uuid::new_v4().to_string(),
                        invitation_ids: chunk.to_vec(),
                    }
                )?;
                results.extend(done.results);
            }
            show_results(client.json, "resent", results)
        }
        InvitationsCommand::Revoke { ids } => {
            let mut results = Vec::new();
            for chunk in ids.chunks(MAX_IDS) {
                let done = rpc!(
                    client,
                    InvitationServiceClient,
                    revoke_invitations,
                    RevokeInvitationsRequest {
                        invitation_ids: chunk.to_vec(),
                    }
                )?;
                results.extend(done.results);
            }
            show_results(client.json, "revoked", results)
        }
        InvitationsCommand::Delete { ids, yes } => {
            confirm(yes, &format!("Delete {} invitation record(s)?", ids.len()))?;
            let mut results = Vec::new();
            for chunk in ids.chunks(MAX_IDS) {
                let done = rpc!(
                    client,
                    InvitationServiceClient,
                    delete_invitations,
                    DeleteInvitationsRequest {
                        invitation_ids: chunk.to_vec(),
                    }
                )?;
                results.extend(done.results);
            }
            show_results(client.json, "deleted", results)
        }
    }
}

async fn list(client: &mut Client, args: ListArgs) -> anyhow::Result<()> {
    let limit = if args.all { usize::MAX } else { args.limit };
    let states: Vec<i32> = args
        .states
        .iter()
        .map(|s| InvitationState::from(*s) as i32)
        .collect();
    let mut shown = ListInvitationsResponse::default();
    let mut page_token = String::new();
    loop {
        let wanted = limit.saturating_sub(shown.invitations.len()).clamp(1, 500);
        let page = rpc!(
            client,
            InvitationServiceClient,
            list_invitations,
            ListInvitationsRequest {
                page_size: i32::try_from(wanted).unwrap_or(500),
                page_token: page_token.clone(),
                states: states.clone(),
                query: args.query.clone(),
                order_by: InvitationOrderBy::CreateTimeDesc as i32,
                ..Default::default()
            }
        )?;
        shown.invitations.extend(page.invitations);
        shown.total_size = page.total_size;
        shown.total_size_capped = page.total_size_capped;
        shown.next_page_token = page.next_page_token;
        if shown.next_page_token.is_empty() || shown.invitations.len() >= limit {
            break;
        }
        page_token = shown.next_page_token.clone();
    }
    shown.invitations.truncate(limit);
    if client.json {
        return output::json("usher.invitation.v1.ListInvitationsResponse", &shown);
    }
    line(output::table(
        &[
            "ID",
            "EMAIL",
            "STATE",
            "ROLE",
            "INVITED BY",
            "EXPIRES",
            "EMAIL SENT",
        ],
        shown.invitations.iter().map(row),
    ));
    line(output::count_line(
        shown.invitations.len(),
        shown.total_size,
        shown.total_size_capped,
        "invitation",
    ));
    Ok(())
}

/// The short state name, e.g. `PENDING`.
pub fn state_name(state: i32) -> String {
    InvitationState::try_from(state).map_or_else(
        |_| format!("state {state}"),
        |s| enum_name(s.as_str_name(), "INVITATION_STATE_"),
    )
}

/// One row of the invitations table.
pub fn row(invitation: &Invitation) -> Vec<String> {
    let delivery = invitation
        .latest_delivery
        .as_ref()
        .map_or_else(String::new, |d| {
            let status = usher_proto::notification::v1::DeliveryStatus::try_from(d.status)
                .map_or_else(
                    |_| d.status.to_string(),
                    |s| enum_name(s.as_str_name(), "DELIVERY_STATUS_"),
                );
            if d.reason.is_empty() {
                status
            } else {
                format!("{status}: {}", d.reason)
            }
        });
    vec![
        invitation.id.clone(),
        invitation.email.clone(),
        state_name(invitation.state),
        invitation.role_name.clone(),
        invitation
            .inviter
            .as_ref()
            .map(|a| a.display_name.clone())
            .unwrap_or_default(),
        output::time(invitation.expire_time.as_ref()),
        delivery,
    ]
}

/// One row per item of a bulk action.
pub fn result_row(verb: &str, result: &InvitationResult) -> Vec<String> {
    let outcome = match &result.error {
        Some(error) => format!("{}: {}", error.reason, error.message),
        None => verb.to_owned(),
    };
    let email = result
        .invitation
        .as_ref()
        .map(|i| i.email.clone())
        .unwrap_or_default();
    vec![result.invitation_id.clone(), email, outcome]
}

fn show_results(json: bool, verb: &str, results: Vec<InvitationResult>) -> anyhow::Result<()> {
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    if json {
        // The same shape as one call's response, for every call together.
        let merged = usher_proto::invitation::v1::RevokeInvitationsResponse {
            succeeded_count: i32::try_from(results.len() - failed).unwrap_or(i32::MAX),
            failed_count: i32::try_from(failed).unwrap_or(i32::MAX),
            results,
        };
        return output::json("usher.invitation.v1.RevokeInvitationsResponse", &merged);
    }
    line(output::table(
        &["ID", "EMAIL", "OUTCOME"],
        results.iter().map(|r| result_row(verb, r)),
    ));
    line(format!(
        "{} {verb}, {failed} failed",
        results.len() - failed
    ));
    if failed > 0 {
        anyhow::bail!("{failed} invitation(s) failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use usher_proto::identity::v1::ItemError;

    use super::*;

    #[test]
    fn bulk_results_show_the_reason_of_each_failure() {
        let ok = InvitationResult {
            invitation_id: "i1".into(),
            invitation: Some(Invitation {
                email: "ada@example.com".into(),
                ..Default::default()
            }),
            error: None,
        };
        let failed = InvitationResult {
            invitation_id: "i2".into(),
            invitation: None,
            error: Some(ItemError {
                reason: "RESEND_COOLDOWN".into(),
                message: "resent too recently".into(),
            }),
        };
        assert_eq!(
            result_row("resent", &ok),
            ["i1", "ada@example.com", "resent"]
        );
        assert_eq!(
            result_row("resent", &failed),
            ["i2", "", "RESEND_COOLDOWN: resent too recently"]
        );
    }

    #[test]
    fn states_have_short_names() {
        assert_eq!(state_name(InvitationState::Pending as i32), "PENDING");
        assert_eq!(
            InvitationState::from(StateArg::Declined),
            InvitationState::Declined
        );
    }
}
