//! Text inputs: one rule for every string a caller sends, in every service.
//!
//! Control characters (Unicode `Cc`: U+0000–U+001F, U+007F–U+009F) are
//! refused with `INVALID_ARGUMENT` naming the field, before a handler looks
//! at the request, so that none reaches a store (PostgreSQL refuses U+0000
//! in text and JSON, which would otherwise surface as `INTERNAL`). The rule
//! of each field ([`rule`]):
//!
//! - [`TextRule::SingleLine`], the default: no control character at all.
//! - [`TextRule::MultiLine`]: tab, line feed and carriage return are allowed,
//!   other control characters are not. Pasted invitee text (`raw_text`),
//!   descriptions, and the string values inside `google.protobuf.Struct`
//!   metadata (free-form platform data).
//! - [`TextRule::Own`]: the RPC applies its own rule and answer. Passwords
//!   (any character is allowed, they are only hashed), link and refresh
//!   tokens (an unusable token has its one answer, they are only hashed),
//!   and the addresses of `CreateInvitations.invitees`, which get the
//!   `INVALID_ADDRESS` verdict rather than failing the call.
//!
//! `google.protobuf.Struct` fields are walked: every key (single line) and
//! every string value (multi-line), nested structs and lists included, is
//! named by its path, for example `metadata.lines[2].label`.

use std::sync::OnceLock;

use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MapKey, ReflectMessage, Value,
};
use prost_types::value::Kind as StructKind;

use crate::error::{ApiError, ApiResult, Violations};

/// Which control characters a text field accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextRule {
    /// No control character.
    SingleLine,
    /// Tab, line feed and carriage return; no other control character.
    MultiLine,
    /// Not checked here: the RPC applies its own rule.
    Own,
}

/// The first character of `value` that `rule` refuses, if any.
pub fn refused_char(value: &str, rule: TextRule) -> Option<char> {
    match rule {
        TextRule::Own => None,
        TextRule::SingleLine => value.chars().find(|c| c.is_control()),
        TextRule::MultiLine => value
            .chars()
            .find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')),
    }
}

/// The description of a field violation for `rule`.
fn description(rule: TextRule) -> &'static str {
    match rule {
        TextRule::MultiLine => {
            "must not contain control characters other than tab, line feed and carriage return"
        }
        TextRule::SingleLine | TextRule::Own => "must not contain control characters",
    }
}

/// Checks one text value: `INVALID_ARGUMENT` on `field` when `rule` refuses
/// one of its characters.
pub fn check(field: &str, value: &str, rule: TextRule) -> ApiResult<()> {
    match refused_char(value, rule) {
        Some(_) => Err(ApiError::invalid(field, description(rule))),
        None => Ok(()),
    }
}

/// Adds a violation for `value` at `field` when `rule` refuses it.
fn add(violations: &mut Violations, field: &str, value: &str, rule: TextRule) {
    if refused_char(value, rule).is_some() {
        violations.add(field, description(rule));
    }
}

/// Checks the keys (single line) and string values (multi-line) of a
/// `google.protobuf.Struct` at `field`, nested ones included.
pub fn check_struct(field: &str, value: &prost_types::Struct) -> ApiResult<()> {
    let mut violations = Violations::new();
    walk_struct(&mut violations, field, value);
    violations.into_result()
}

fn walk_struct(violations: &mut Violations, path: &str, value: &prost_types::Struct) {
    let mut keys: Vec<&String> = value.fields.keys().collect();
    keys.sort();
    for key in keys {
        let path = format!("{path}.{key}");
        add(violations, &path, key, TextRule::SingleLine);
        walk_value(violations, &path, &value.fields[key]);
    }
}

fn walk_value(violations: &mut Violations, path: &str, value: &prost_types::Value) {
    match &value.kind {
        Some(StructKind::StringValue(text)) => add(violations, path, text, TextRule::MultiLine),
        Some(StructKind::StructValue(inner)) => walk_struct(violations, path, inner),
        Some(StructKind::ListValue(list)) => {
            for (index, item) in list.values.iter().enumerate() {
                walk_value(violations, &format!("{path}[{index}]"), item);
            }
        }
        Some(StructKind::NullValue(_) | StructKind::NumberValue(_) | StructKind::BoolValue(_))
        | None => {}
    }
}

/// The rule of a string field of a request.
pub fn rule(field: &FieldDescriptor) -> TextRule {
    match field.name() {
        "password" | "owner_password" | "current_password" | "new_password" | "token"
        | "refresh_token" => TextRule::Own,
        "raw_text" | "description" => TextRule::MultiLine,
        _ if field.full_name() == "usher.invitation.v1.InviteeInput.email" => TextRule::Own,
        _ => TextRule::SingleLine,
    }
}

/// Usher's descriptors, decoded once.
fn pool() -> Option<&'static DescriptorPool> {
    static POOL: OnceLock<Option<DescriptorPool>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(usher_proto::FILE_DESCRIPTOR_SET).ok())
        .as_ref()
}

/// Checks every string of `message` (nested messages, lists, maps and
/// `Struct` values included) against its field's [`rule`], reporting every
/// field at fault at once, each by its path (`invitees[3].display_name`).
pub fn check_message<M: prost::Message + prost::Name>(message: &M) -> ApiResult<()> {
    let Some(descriptor) = pool().and_then(|pool| pool.get_message_by_name(&M::full_name())) else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "no descriptor for {}",
            M::full_name()
        )));
    };
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("re-decoding a request: {e}")))?;
    let mut violations = Violations::new();
    walk_message(&mut violations, "", &dynamic);
    violations.into_result()
}

/// [`check_message`] for the message of a request, as a `Status`.
pub fn check_request<M: prost::Message + prost::Name>(
    request: &tonic::Request<M>,
) -> Result<(), tonic::Status> {
    check_message(request.get_ref()).map_err(tonic::Status::from)
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

fn walk_message(violations: &mut Violations, prefix: &str, message: &DynamicMessage) {
    for (field, value) in message.fields() {
        let path = join(prefix, field.name());
        walk_field(violations, &path, &field, value);
    }
}

fn walk_field(violations: &mut Violations, path: &str, field: &FieldDescriptor, value: &Value) {
    match value {
        Value::String(text) => add(violations, path, text, rule(field)),
        Value::List(items) => {
            for (index, item) in items.iter().enumerate() {
                walk_field(violations, &format!("{path}[{index}]"), field, item);
            }
        }
        Value::Map(entries) => {
            let value_field = match field.kind() {
                Kind::Message(entry) => entry.map_entry_value_field(),
                _ => return,
            };
            let mut entries: Vec<_> = entries.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            for (key, item) in entries {
                let path = match key {
                    MapKey::String(key) => {
                        add(violations, path, key, TextRule::SingleLine);
                        format!("{path}.{key}")
                    }
                    other => format!("{path}[{other:?}]"),
                };
                walk_field(violations, &path, &value_field, item);
            }
        }
        Value::Message(inner) => {
            if inner.descriptor().full_name() == "google.protobuf.Struct" {
                if let Ok(value) = inner.transcode_to::<prost_types::Struct>() {
                    walk_struct(violations, path, &value);
                }
            } else {
                walk_message(violations, path, inner);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost_types::{ListValue, Struct, Value as JsonValue};
    use usher_proto::{identity::v1 as identity, invitation::v1 as invitation};

    use super::*;

    fn fields(err: ApiError) -> Vec<String> {
        match err {
            ApiError::InvalidArgument(list) => list.into_iter().map(|v| v.field).collect(),
            other => panic!("not a field error: {other:?}"),
        }
    }

    fn string(text: &str) -> JsonValue {
        JsonValue {
            kind: Some(StructKind::StringValue(text.to_owned())),
        }
    }

    #[test]
    fn single_line_refuses_every_control_character() {
        for c in (0u32..0x20).chain(0x7f..0xa0).filter_map(char::from_u32) {
            let value = format!("a{c}b");
            assert!(
                check("name", &value, TextRule::SingleLine).is_err(),
                "{c:?}"
            );
        }
        check("name", "Zoë O'Brien — 東京", TextRule::SingleLine).expect("printable text");
        check("name", "", TextRule::SingleLine).expect("empty");
    }

    #[test]
    fn multi_line_allows_tabs_and_line_breaks_only() {
        check(
            "raw_text",
            "a@x.example\tAda\r\nb@x.example",
            TextRule::MultiLine,
        )
        .expect("pasted text");
        for bad in ["a\0b", "a\u{1b}[31m", "a\u{7f}", "a\u{85}"] {
            assert_eq!(
                fields(check("raw_text", bad, TextRule::MultiLine).expect_err(bad)),
                ["raw_text"]
            );
        }
        assert!(check("secret", "a\0b", TextRule::Own).is_ok());
    }

    #[test]
    fn struct_keys_and_nested_values_are_named_by_path() {
        let inner = Struct {
            fields: BTreeMap::from([("label".to_owned(), string("bad\0"))]),
        };
        let metadata = Struct {
            fields: BTreeMap::from([
                ("note".to_owned(), string("line one\nline two")),
                ("bad\u{1}key".to_owned(), string("fine")),
                (
                    "lines".to_owned(),
                    JsonValue {
                        kind: Some(StructKind::ListValue(ListValue {
                            values: vec![
                                string("ok"),
                                JsonValue {
                                    kind: Some(StructKind::StructValue(inner)),
                                },
                            ],
                        })),
                    },
                ),
            ]),
        };
        assert_eq!(
            fields(check_struct("metadata", &metadata).expect_err("bad")),
            ["metadata.bad\u{1}key", "metadata.lines[1].label"]
        );
    }

    #[test]
    fn requests_are_checked_field_by_field_with_each_fields_rule() {
        let request = invitation::CreateInvitationsRequest {
            raw_text: "ada@x.example\nbob@x.example".into(),
            invitees: vec![
                invitation::InviteeInput {
                    email: "not\0an address".into(),
                    display_name: "Ada".into(),
                },
                invitation::InviteeInput {
                    email: "b@x.example".into(),
                    display_name: "B\0b".into(),
                },
            ],
            metadata: Some(Struct {
                fields: BTreeMap::from([("k".to_owned(), string("v\0"))]),
            }),
            locale: "e\tn".into(),
            request_id: "id\0".into(),
            ..Default::default()
        };
        assert_eq!(
            fields(check_message(&request).expect_err("bad")),
            [
                "request_id",
                "invitees[1].display_name",
                "metadata.k",
                "locale"
            ]
        );
        let fine = identity::SignInRequest {
            account_slug: "acme".into(),
            password: "tab\tand\0nul are the password's business".into(),
            login: Some(identity::sign_in_request::Login::Email(
                "a@x.example".into(),
            )),
        };
        check_message(&fine).expect("passwords are not checked here");
        let bad = identity::SignInRequest {
            login: Some(identity::sign_in_request::Login::Email(
                "a\0@x.example".into(),
            )),
            ..fine
        };
        assert_eq!(fields(check_message(&bad).expect_err("bad")), ["email"]);
    }
}
