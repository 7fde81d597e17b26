//! Property tests over untrusted input: the pgoutput decoder, the replication frame parser's
//! building blocks and the sink's message parser never panic, and never trust a length field.
//! Bounded: a fixed number of cases per property (PROPTEST_CASES raises it for longer runs).

use bytes::Bytes;
use cdc_relay::event::ChangeEvent;
use cdc_relay::source::postgres::pgoutput::{decode, PgOutput};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(4000),
        ..ProptestConfig::default()
    }
}

/// A well-formed Insert with the given text values, to mutate.
fn insert(values: &[Option<String>]) -> Vec<u8> {
    let mut m = vec![b'I'];
    m.extend_from_slice(&16385u32.to_be_bytes());
    m.push(b'N');
    m.extend_from_slice(&(values.len() as u16).to_be_bytes());
    for v in values {
        match v {
            None => m.push(b'n'),
            Some(s) => {
                m.push(b't');
                m.extend_from_slice(&(s.len() as u32).to_be_bytes());
                m.extend_from_slice(s.as_bytes());
            }
        }
    }
    m
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&Bytes::from(data));
    }

    #[test]
    fn decoder_never_panics_on_messages_with_a_known_tag(tag in prop::sample::select(b"BCORYIUDTM".to_vec()), rest in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut data = vec![tag];
        data.extend(rest);
        let _ = decode(&Bytes::from(data));
    }

    #[test]
    fn valid_inserts_round_trip_and_mutations_fail_cleanly(
        values in proptest::collection::vec(proptest::option::of("\\PC{0,40}"), 0..12),
        flip_at in any::<prop::sample::Index>(),
        flip_to in any::<u8>(),
    ) {
        let good = insert(&values);
        match decode(&Bytes::from(good.clone())) {
            Ok(PgOutput::Insert { new, .. }) => prop_assert_eq!(new.len(), values.len()),
            other => prop_assert!(false, "valid insert not decoded: {:?}", other),
        }
        let i = flip_at.index(good.len());
        // Every strict prefix of a valid message is malformed...
        prop_assert!(decode(&Bytes::from(good[..i].to_vec())).is_err());
        // ...and any one-byte change decodes or fails, without a panic.
        let mut bad = good;
        bad[i] = flip_to;
        let _ = decode(&Bytes::from(bad));
    }

    #[test]
    fn forged_lengths_are_refused_without_allocating(count in any::<u16>(), len in any::<u32>()) {
        // A tuple that claims `count` columns and a value of `len` bytes, with almost nothing behind.
        let mut m = vec![b'I', 0, 0, 0, 1, b'N'];
        m.extend_from_slice(&count.to_be_bytes());
        m.push(b't');
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(b"abc");
        let r = decode(&Bytes::from(m));
        if !(count == 1 && len == 3) {
            prop_assert!(r.is_err());
        }
    }

    #[test]
    fn sink_parser_never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = ChangeEvent::from_json(&data);
    }

    #[test]
    fn sink_parser_never_panics_on_json_like_input(
        id in proptest::option::of(any::<i64>()),
        op in "[a-z]{0,10}",
        user in proptest::option::of("\\PC{0,20}"),
        ts in proptest::option::of(any::<f64>().prop_filter("finite", |f| f.is_finite())),
        event_time in proptest::option::of("[0-9T:. -]{0,30}"),
        lsn in "[0-9A-F/]{0,20}",
        version in any::<u64>(),
    ) {
        let v = serde_json::json!({"id": id, "op": op, "user": user, "event": null, "timestamp": ts,
            "event_time": event_time, "lsn": lsn, "version": version});
        if let Ok(e) = ChangeEvent::from_json(&serde_json::to_vec(&v).unwrap()) {
            // Whatever is accepted is usable: the time conversion cannot panic either.
            let _ = e.event_time_micros();
        }
    }
}
