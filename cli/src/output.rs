//! What the CLI prints: readable tables, or with `--json` the protobuf JSON
//! of the responses (proto field names, enums by name, defaults included),
//! so scripts read exactly what the API returned.
//!
//! Everything meant for stdout goes through here; messages for the person at
//! the terminal (progress, hints) go to stderr.

use std::sync::OnceLock;

use anyhow::Context;
use comfy_table::{ContentArrangement, Table, presets};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

/// The line under a listing: how many `noun`s are shown of how many match,
/// e.g. `50 of 120 users`, or `50 of 1000+ users` when more matched than
/// the service counts.
pub fn count_line(shown: usize, total: i32, capped: bool, noun: &str) -> String {
    let plus = if capped { "+" } else { "" };
    let plural = if total == 1 && !capped { "" } else { "s" };
    format!("{shown} of {total}{plus} {noun}{plural}")
}

/// Prints `text` and a new line on stdout.
#[allow(clippy::print_stdout)]
pub fn line(text: impl std::fmt::Display) {
    println!("{text}");
}

/// Prints `text` and a new line on stderr.
#[allow(clippy::print_stderr)]
pub fn note(text: impl std::fmt::Display) {
    eprintln!("{text}");
}

/// A table with `headers` and `rows`, sized to the terminal when there is
/// one.
pub fn table<S: AsRef<str>>(headers: &[&str], rows: impl IntoIterator<Item = Vec<S>>) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(headers.iter().copied());
    for row in rows {
        table.add_row(row.iter().map(AsRef::as_ref));
    }
    table.to_string()
}

fn pool() -> anyhow::Result<&'static DescriptorPool> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(usher_proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("the compiled protobuf descriptors are unreadable: {e}"))
}

/// The protobuf JSON of `message`, whose full protobuf name is `name`
/// (e.g. `usher.identity.v1.ListUsersResponse`).
pub fn to_json<M: prost::Message>(name: &str, message: &M) -> anyhow::Result<serde_json::Value> {
    let descriptor = pool()?
        .get_message_by_name(name)
        .with_context(|| format!("no protobuf message named {name}"))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .with_context(|| format!("re-reading a {name}"))?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .with_context(|| format!("encoding a {name} as JSON"))
}

/// Prints `message` as pretty JSON on stdout.
pub fn json<M: prost::Message>(name: &str, message: &M) -> anyhow::Result<()> {
    let value = to_json(name, message)?;
    line(serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// A protobuf timestamp as `YYYY-MM-DD HH:MM` UTC; empty when unset.
pub fn time(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

/// An enum's protobuf name without its prefix, e.g. `ACTIVE` for
/// `USER_STATUS_ACTIVE`.
pub fn enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

#[cfg(test)]
mod tests {
    use usher_proto::identity::v1::{ListUsersResponse, User, UserStatus};

    use super::*;

    #[test]
    fn json_uses_proto_names_enum_names_and_keeps_defaults() {
        let response = ListUsersResponse {
            users: vec![User {
                id: "u1".into(),
                email: "ada@example.com".into(),
                status: UserStatus::Active.into(),
                create_time: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                ..Default::default()
            }],
            next_page_token: String::new(),
            total_size: 1,
            total_size_capped: false,
        };
        let value =
            to_json("usher.identity.v1.ListUsersResponse", &response).expect("encodes as JSON");
        let user = &value["users"][0];
        assert_eq!(user["email"], "ada@example.com");
        assert_eq!(user["status"], "USER_STATUS_ACTIVE");
        assert_eq!(user["create_time"], "2023-11-14T22:13:20Z");
        assert_eq!(user["owner"], false, "defaults are kept");
        assert_eq!(value["total_size"], 1);
    }

    #[test]
    fn an_unknown_message_name_is_an_error() {
        let error =
            to_json("usher.nope.Nothing", &ListUsersResponse::default()).expect_err("unknown name");
        assert!(error.to_string().contains("usher.nope.Nothing"));
    }

    #[test]
    fn tables_hold_headers_and_cells() {
        let shown = table(&["EMAIL", "STATUS"], [vec!["ada@example.com", "ACTIVE"]]);
        assert!(shown.contains("EMAIL"), "{shown}");
        assert!(shown.contains("ada@example.com"), "{shown}");
        assert!(shown.contains("ACTIVE"), "{shown}");
    }

    #[test]
    fn times_and_enum_names_are_short() {
        assert_eq!(time(None), "");
        let t = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        };
        assert_eq!(time(Some(&t)), "2023-11-14 22:13");
        assert_eq!(
            enum_name("USER_STATUS_ACTIVE", "USER_STATUS_"),
            "ACTIVE".to_owned()
        );
    }
}
