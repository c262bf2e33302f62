//! Conversions between stored values (chrono times, JSON columns) and
//! protobuf well-known types, shared by every service.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_struct_round_trip() {
        let json = serde_json::json!({"a": 1.5, "b": [true, null, "x"], "c": {"d": "e"}});
        assert_eq!(struct_to_json(&json_to_struct(&json)), json);
        assert_eq!(json_to_struct(&Json::Null), Struct::default());
    }

    #[test]
    fn strings_read_only_string_items() {
        let json = json_strings(["a", "b"]);
        assert_eq!(strings(&json), vec!["a", "b"]);
        assert!(strings(&serde_json::json!({"a": 1})).is_empty());
    }
}
