//! The JSON Schema in docs/message-format.md describes what the relay really sends.

use cdc_relay::event::{ChangeEvent, Op, Row, RowKey, SeedRow};
use serde_json::Value;

fn schema() -> Value {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/message-format.md"
    ))
    .unwrap();
    let start = doc.find("## JSON Schema").expect("schema section");
    let block = &doc[start..];
    let open = block.find("```json").unwrap() + "```json".len();
    let close = block[open..].find("```").unwrap() + open;
    serde_json::from_str(&block[open..close]).expect("the schema is valid JSON")
}

fn type_ok(value: &Value, ty: &Value) -> bool {
    let one = |t: &str| match t {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "null" => value.is_null(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    };
    match ty {
        Value::String(t) => one(t),
        Value::Array(ts) => ts.iter().any(|t| one(t.as_str().unwrap())),
        _ => true,
    }
}

fn validate(schema: &Value, event: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let obj = event.as_object().unwrap();
    for r in schema["required"].as_array().unwrap() {
        if !obj.contains_key(r.as_str().unwrap()) {
            errors.push(format!("missing {r}"));
        }
    }
    if event["op"] != "truncate" && !obj.contains_key("id") {
        errors.push("missing id".into());
    }
    let props = schema["properties"].as_object().unwrap();
    for (k, v) in obj {
        let Some(p) = props.get(k) else {
            errors.push(format!("{k} is not in the schema"));
            continue;
        };
        if let Some(t) = p.get("type") {
            if !type_ok(v, t) {
                errors.push(format!("{k}: {v} is not {t}"));
            }
        }
        if let Some(e) = p.get("enum") {
            if !e.as_array().unwrap().contains(v) {
                errors.push(format!("{k}: {v} not in {e}"));
            }
        }
    }
    errors
}

#[test]
fn every_kind_of_event_matches_the_documented_schema() {
    let schema = schema();
    let seed = SeedRow {
        user: Some("user1".into()),
        event: Some("login".into()),
        timestamp: Some(1_672_531_200.5),
        event_time: Some("2023-01-01T00:00:00.5".into()),
        extra: vec![],
    };
    let base = ChangeEvent {
        key: Some(RowKey::Int(1)),
        op: Op::Insert,
        row: Row::Seed(seed.clone()),
        lsn: "0/16B3748".into(),
        version: 23_803_720,
        unchanged: vec![],
        json_null: vec![],
        moved_from: None,
        schema: None,
    };
    let mut events = vec![base.clone()];
    for op in [Op::Snapshot, Op::Update, Op::Delete] {
        events.push(ChangeEvent { op, ..base.clone() });
    }
    events.push(ChangeEvent {
        key: None,
        op: Op::Truncate,
        row: Row::Seed(SeedRow::default()),
        ..base.clone()
    });
    events.push(ChangeEvent {
        unchanged: vec!["username".into()],
        row: Row::Seed(SeedRow {
            user: None,
            ..seed.clone()
        }),
        op: Op::Update,
        ..base.clone()
    });
    for e in &events {
        let json: Value = serde_json::from_slice(&e.to_json()).unwrap();
        let errors = validate(&schema, &json);
        assert!(errors.is_empty(), "{json}: {errors:?}");
    }
    // The validator itself catches a wrong event.
    let bad = serde_json::json!({"id": "1", "op": "upsert", "lsn": "0/1", "version": 1});
    assert!(validate(&schema, &bad).len() >= 3);
}
