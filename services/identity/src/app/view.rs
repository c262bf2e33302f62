//! Conversions between stored rows and protobuf messages.

use usher_proto::identity::v1 as pb;

use crate::{
    domain::{Origin, USERS_MANAGE, UserStatus},
    store::entities::{account, role, team, user},
};

pub use usher_kit::convert::{
    json_strings, json_to_struct, optional_timestamp, strings, struct_to_json, timestamp,
};

/// An account as the API shows it. Its invitation lifetime is the effective
/// one: the account's own, or the deployment default (`default_lifetime`,
/// `accounts.default_invitation_lifetime_secs`) when it has none.
pub fn account(
    model: &account::Model,
    seats_used: u64,
    default_lifetime: chrono::Duration,
) -> pb::Account {
    pb::Account {
        id: model.id.to_string(),
        name: model.name.clone(),
        slug: model.slug.clone(),
        default_locale: model.default_locale.clone(),
        owner_user_id: model
            .owner_user_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        subscription: Some(pb::Subscription {
            seat_limit: model.seat_limit,
            products: strings(&model.products),
        }),
        seats_used: i32::try_from(seats_used).unwrap_or(i32::MAX),
        allowed_email_domains: strings(&model.allowed_email_domains),
        invitation_lifetime: Some(prost_types::Duration {
            seconds: model
                .invitation_lifetime_secs
                .map_or_else(|| default_lifetime.num_seconds(), i64::from),
            nanos: 0,
        }),
        create_time: Some(timestamp(model.create_time)),
        update_time: Some(timestamp(model.update_time)),
    }
}

/// A role as the API shows it.
pub fn role(model: &role::Model, user_count: u64) -> pb::Role {
    let permissions = strings(&model.permissions);
    pb::Role {
        id: model.id.to_string(),
        name: model.name.clone(),
        description: model.description.clone(),
        manages_users: permissions.iter().any(|p| p == USERS_MANAGE),
        permissions,
        built_in: model.built_in,
        user_count: i32::try_from(user_count).unwrap_or(i32::MAX),
        create_time: Some(timestamp(model.create_time)),
        update_time: Some(timestamp(model.update_time)),
    }
}

/// A team as the API shows it.
pub fn team(model: &team::Model, member_count: u64) -> pb::Team {
    pb::Team {
        id: model.id.to_string(),
        name: model.name.clone(),
        description: model.description.clone(),
        member_count: i32::try_from(member_count).unwrap_or(i32::MAX),
        create_time: Some(timestamp(model.create_time)),
        update_time: Some(timestamp(model.update_time)),
    }
}

/// The protobuf status of a stored status.
pub fn user_status(status: UserStatus) -> pb::UserStatus {
    match status {
        UserStatus::Invited => pb::UserStatus::Invited,
        UserStatus::Active => pb::UserStatus::Active,
        UserStatus::Inactive => pb::UserStatus::Inactive,
    }
}

/// A user as the API shows it, with the names of its role and team.
pub fn user(model: &user::Model, role_name: &str, team_name: Option<&str>) -> pb::User {
    let origin = match model.origin {
        Origin::Owner => pb::UserOrigin::AccountOwner,
        Origin::Invitation => pb::UserOrigin::Invitation,
        Origin::Direct => pb::UserOrigin::Direct,
    };
    pb::User {
        id: model.id.to_string(),
        account_id: model.account_id.to_string(),
        email: model.email.clone().unwrap_or_default(),
        username: model.username.clone().unwrap_or_default(),
        display_name: model.display_name.clone(),
        status: user_status(model.status) as i32,
        role_id: model.role_id.to_string(),
        role_name: role_name.to_owned(),
        team_id: model.team_id.map(|t| t.to_string()).unwrap_or_default(),
        team_name: team_name.unwrap_or_default().to_owned(),
        products: strings(&model.products),
        locale: model.locale.clone(),
        metadata: model.metadata.as_ref().map(json_to_struct),
        owner: model.owner,
        origin: origin as i32,
        password_change_required: model.password_change_required,
        invitation_id: model
            .invitation_id
            .map(|i| i.to_string())
            .unwrap_or_default(),
        create_time: Some(timestamp(model.create_time)),
        update_time: Some(timestamp(model.update_time)),
        activate_time: optional_timestamp(model.activate_time),
        deactivate_time: optional_timestamp(model.deactivate_time),
        last_sign_in_time: optional_timestamp(model.last_sign_in_time),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_between_struct_and_json() {
        let json = serde_json::json!({
            "lines": ["+33 1 23", "+33 1 24"],
            "limit": 3.0,
            "nested": {"on": true, "none": null},
        });
        assert_eq!(struct_to_json(&json_to_struct(&json)), json);
    }
}
