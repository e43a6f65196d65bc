//! The JSON Schema files in `schemas/json/` are generated from the envelope types; this test
//! fails when they are stale. Regenerate them with
//! `CHATFLEET_BLESS=1 cargo test -p chatfleet-schemas --test json_schema_files`.

use std::path::PathBuf;

use chatfleet_schemas::{ChannelDelivery, ReplyEvent, UserMessage};

/// The value with every object's keys sorted, so the file does not depend on whether some
/// other crate in the build enabled serde_json's `preserve_order`.
fn canonical(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let sorted: std::collections::BTreeMap<_, _> = map.into_iter().map(|(k, v)| (k, canonical(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

fn check(file: &str, schema: schemars::Schema) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json").join(file);
    let fresh = serde_json::to_string_pretty(&canonical(schema.to_value())).unwrap() + "\n";
    if std::env::var_os("CHATFLEET_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == fresh,
        "{} is stale: regenerate it with CHATFLEET_BLESS=1 cargo test -p chatfleet-schemas --test json_schema_files",
        path.display()
    );
}

#[test]
fn user_message_schema_file_is_up_to_date() {
    check("user-message.v1.schema.json", schemars::schema_for!(UserMessage));
}

#[test]
fn reply_event_schema_file_is_up_to_date() {
    check("reply-event.v1.schema.json", schemars::schema_for!(ReplyEvent));
}

#[test]
fn channel_delivery_schema_file_is_up_to_date() {
    check("channel-delivery.v1.schema.json", schemars::schema_for!(ChannelDelivery));
}
