//! Conversions between stored rows and protobuf messages.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};
use usher_proto::identity::v1 as pb;

use crate::{
    domain::{Origin, USERS_MANAGE, UserStatus},
    store::entities::{account, role, team, user},
};

/// A protobuf timestamp.
pub fn timestamp(time: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// An optional protobuf timestamp.
pub fn optional_timestamp(time: Option<DateTime<Utc>>) -> Option<Timestamp> {
    time.map(timestamp)
}

/// The strings of a JSON array column (anything else reads as empty).
pub fn strings(json: &Json) -> Vec<String> {
    json.as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A JSON array column from strings.
pub fn json_strings<I: IntoIterator<Item = S>, S: Into<String>>(items: I) -> Json {
    Json::Array(items.into_iter().map(|s| Json::String(s.into())).collect())
}

/// A `google.protobuf.Struct` as JSON.
pub fn struct_to_json(value: &Struct) -> Json {
    Json::Object(
        value
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(value: &Value) -> Json {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::NumberValue(n)) => Number::from_f64(*n).map_or(Json::Null, Json::Number),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(value_to_json).collect()),
    }
}

/// JSON as a `google.protobuf.Struct` (non-objects give an empty struct).
pub fn json_to_struct(json: &Json) -> Struct {
    match json {
        Json::Object(map) => object_to_struct(map),
        _ => Struct::default(),
    }
}

fn object_to_struct(map: &Map<String, Json>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn json_to_value(json: &Json) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Json::Object(map) => Kind::StructValue(object_to_struct(map)),
    };
    Value { kind: Some(kind) }
}

/// An account as the API shows it.
pub fn account(model: &account::Model, seats_used: u64) -> pb::Account {
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
        invitation_lifetime: model
            .invitation_lifetime_secs
            .map(|secs| prost_types::Duration {
                seconds: i64::from(secs),
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
pub fn user_status(stored: &str) -> pb::UserStatus {
    match UserStatus::parse(stored) {
        Some(UserStatus::Invited) => pb::UserStatus::Invited,
        Some(UserStatus::Active) => pb::UserStatus::Active,
        Some(UserStatus::Inactive) => pb::UserStatus::Inactive,
        None => pb::UserStatus::Unspecified,
    }
}

/// A user as the API shows it, with the names of its role and team.
pub fn user(model: &user::Model, role_name: &str, team_name: Option<&str>) -> pb::User {
    let origin = match Origin::parse(&model.origin) {
        Some(Origin::Owner) => pb::UserOrigin::AccountOwner,
        Some(Origin::Invitation) => pb::UserOrigin::Invitation,
        Some(Origin::Direct) => pb::UserOrigin::Direct,
        None => pb::UserOrigin::Unspecified,
    };
    pb::User {
        id: model.id.to_string(),
        account_id: model.account_id.to_string(),
        email: model.email.clone().unwrap_or_default(),
        username: model.username.clone().unwrap_or_default(),
        display_name: model.display_name.clone(),
        status: user_status(&model.status) as i32,
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
