//! Tests of the key encoding: order preservation, round trips and malformed input.

use std::cmp::Ordering;
use std::str::FromStr;

use proptest::prelude::*;
use rust_decimal::Decimal;

use super::*;
use crate::Error;

fn decimal(text: &str) -> Value {
    Value::Decimal(Decimal::from_str(text).unwrap())
}

/// Returns a strategy for values of one type (by type rank), biased toward edge cases.
fn value_of_type(rank: u8) -> BoxedStrategy<Value> {
    match rank {
        0 => Just(Value::Null).boxed(),
        1 => any::<bool>().prop_map(Value::Bool).boxed(),
        2 => prop_oneof![Just(i64::MIN), Just(-1i64), Just(0i64), Just(i64::MAX), any::<i64>()]
            .prop_map(Value::Int)
            .boxed(),
        3 => prop_oneof![
            Just(f64::NAN),
            Just(-f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(0.0),
            Just(-0.0),
            Just(f64::MIN_POSITIVE),
            any::<f64>()
        ]
        .prop_map(Value::Float)
        .boxed(),
        4 => prop_oneof![
            (any::<i64>(), 0u32..=28).prop_map(|(mantissa, scale)| Decimal::new(mantissa, scale)),
            (any::<i128>(), 0u32..=28).prop_filter_map(
                "mantissa out of range",
                |(mantissa, scale)| {
                    Decimal::try_from_i128_with_scale(mantissa >> 32, scale).ok()
                }
            ),
        ]
        .prop_map(Value::Decimal)
        .boxed(),
        5 => "[a-c\\x00\\x01\\u{ff}é]{0,6}".prop_map(Value::Text).boxed(),
        6 => proptest::collection::vec(
            prop_oneof![Just(0u8), Just(1u8), Just(0xffu8), any::<u8>()],
            0..6,
        )
        .prop_map(Value::Bytes)
        .boxed(),
        _ => any::<i64>().prop_map(Value::Timestamp).boxed(),
    }
}

/// Returns a strategy for values of every type.
fn any_value() -> impl Strategy<Value = Value> {
    (0u8..8).prop_flat_map(value_of_type)
}

/// Returns a strategy for two values of the same type.
fn same_type_pair() -> impl Strategy<Value = (Value, Value)> {
    (0u8..8).prop_flat_map(|rank| (value_of_type(rank), value_of_type(rank)))
}

fn any_direction() -> impl Strategy<Value = Direction> {
    prop_oneof![Just(Direction::Ascending), Just(Direction::Descending)]
}

/// Compares tuples column by column, reversing descending columns.
fn compare_tuples(a: &[Value], b: &[Value], directions: &[Direction]) -> Ordering {
    for ((a, b), direction) in a.iter().zip(b).zip(directions) {
        let ordering = match direction {
            Direction::Ascending => a.cmp(b),
            Direction::Descending => b.cmp(a),
        };
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    Ordering::Equal
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn encoding_preserves_order(
        columns in proptest::collection::vec((same_type_pair(), any_direction()), 1..4),
    ) {
        // Columns of a key have one type each, so each column pairs two values of one type.
        let a: Vec<Value> = columns.iter().map(|((a, _), _)| a.clone()).collect();
        let b: Vec<Value> = columns.iter().map(|((_, b), _)| b.clone()).collect();
        let directions: Vec<Direction> = columns.iter().map(|(_, direction)| *direction).collect();
        let (encoded_a, encoded_b) = (encode_tuple(&a, &directions), encode_tuple(&b, &directions));
        prop_assert_eq!(encoded_a.cmp(&encoded_b), compare_tuples(&a, &b, &directions), "{:?} vs {:?}", a, b);
    }

    #[test]
    fn values_of_any_types_keep_their_order(a in any_value(), b in any_value(), direction in any_direction()) {
        let (mut encoded_a, mut encoded_b) = (Vec::new(), Vec::new());
        encode_value(&a, direction, &mut encoded_a);
        encode_value(&b, direction, &mut encoded_b);
        let expected = match direction {
            Direction::Ascending => a.cmp(&b),
            Direction::Descending => b.cmp(&a),
        };
        prop_assert_eq!(encoded_a.cmp(&encoded_b), expected);
    }

    #[test]
    fn decimals_keep_their_order(
        a in (any::<i64>(), 0u32..=20), b in (any::<i64>(), 0u32..=20), direction in any_direction(),
    ) {
        let (a, b) = (Value::Decimal(Decimal::new(a.0, a.1)), Value::Decimal(Decimal::new(b.0, b.1)));
        let directions = [direction];
        let expected = compare_tuples(std::slice::from_ref(&a), std::slice::from_ref(&b), &directions);
        let encoded = (encode_tuple(std::slice::from_ref(&a), &directions), encode_tuple(std::slice::from_ref(&b), &directions));
        prop_assert_eq!(encoded.0.cmp(&encoded.1), expected, "{} vs {}", a, b);
    }

    #[test]
    fn round_trip(
        columns in proptest::collection::vec((any_value(), any_direction()), 0..5),
        suffix in proptest::collection::vec(any::<u8>(), 0..4),
    ) {
        let values: Vec<Value> = columns.iter().map(|(value, _)| value.clone()).collect();
        let directions: Vec<Direction> = columns.iter().map(|(_, direction)| *direction).collect();
        let mut encoded = encode_tuple(&values, &directions);
        let length = encoded.len();
        encoded.extend_from_slice(&suffix);
        let (decoded, read) = decode_tuple(&encoded, &directions).unwrap();
        prop_assert_eq!(read, length);
        prop_assert_eq!(&decoded, &values);
        // Equal values re-encode to the same bytes (canonical encoding).
        prop_assert_eq!(encode_tuple(&decoded, &directions), encoded[..length].to_vec());
    }

    #[test]
    fn a_tuple_prefix_is_a_byte_prefix(
        columns in proptest::collection::vec((any_value(), any_direction()), 1..5),
        split in 0usize..5,
    ) {
        let values: Vec<Value> = columns.iter().map(|(value, _)| value.clone()).collect();
        let directions: Vec<Direction> = columns.iter().map(|(_, direction)| *direction).collect();
        let split = split.min(values.len());
        let full = encode_tuple(&values, &directions);
        let prefix = encode_tuple(&values[..split], &directions[..split]);
        prop_assert!(full.starts_with(&prefix));
    }

    #[test]
    fn escaped_bytes_round_trip_and_keep_order(a in proptest::collection::vec(any::<u8>(), 0..8), b in proptest::collection::vec(any::<u8>(), 0..8)) {
        let (mut encoded_a, mut encoded_b) = (Vec::new(), Vec::new());
        encode_escaped(&a, &mut encoded_a);
        encode_escaped(&b, &mut encoded_b);
        prop_assert_eq!(encoded_a.cmp(&encoded_b), a.cmp(&b));
        prop_assert_eq!(decode_escaped(&encoded_a).unwrap(), (a, encoded_a.len()));
    }
}

#[test]
fn known_encodings() {
    use Direction::*;
    let cases: Vec<(Value, Direction, &[u8])> = vec![
        (Value::Null, Ascending, &[0x01]),
        (Value::Null, Descending, &[0xfe]),
        (Value::Bool(true), Ascending, &[0x03]),
        (Value::Int(0), Ascending, &[0x04, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        (Value::Int(-1), Ascending, &[0x04, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
        (Value::Int(1), Descending, &[0xfb, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]),
        (Value::Float(-0.0), Ascending, &[0x05, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        (Value::Text("a\0b".into()), Ascending, &[0x09, b'a', 0x00, 0xff, b'b', 0x00, 0x01]),
        (Value::Bytes(vec![]), Descending, &[0xf5, 0xff, 0xfe]),
        (decimal("0"), Ascending, &[0x07]),
        // 123.45 = 0.12345e3
        (decimal("123.45"), Ascending, &[0x08, 0x80, 0x03, 2, 3, 4, 5, 6, 0x00]),
        // 100 = 0.1e3, and 100.00 encodes the same.
        (decimal("100"), Ascending, &[0x08, 0x80, 0x03, 2, 0x00]),
        (decimal("100.00"), Ascending, &[0x08, 0x80, 0x03, 2, 0x00]),
        // -0.001 = -0.1e-2
        (decimal("-0.001"), Ascending, &[0x06, !0x7f, !0xfe, !2, !0x00]),
    ];
    for (value, direction, expected) in cases {
        let mut encoded = Vec::new();
        encode_value(&value, direction, &mut encoded);
        assert_eq!(encoded, expected, "{value} {direction:?}");
    }
}

#[test]
fn ordering_examples() {
    // Each list is in ascending order.
    let chains: Vec<Vec<Value>> = vec![
        vec![Value::Null, Value::Bool(false), Value::Int(i64::MIN), Value::Text(String::new())],
        vec![
            Value::Float(f64::NEG_INFINITY),
            Value::Float(-1.5),
            Value::Float(0.0),
            Value::Float(f64::MIN_POSITIVE),
            Value::Float(f64::INFINITY),
            Value::Float(f64::NAN),
        ],
        vec![
            decimal("-100"),
            decimal("-99.99"),
            decimal("-0.001"),
            decimal("0"),
            decimal("0.001"),
            decimal("0.0011"),
            decimal("1"),
            decimal("10"),
        ],
        vec![
            Value::Text("".into()),
            Value::Text("\0".into()),
            Value::Text("a".into()),
            Value::Text("a\0".into()),
            Value::Text("ab".into()),
        ],
    ];
    for chain in chains {
        for pair in chain.windows(2) {
            assert!(pair[0] < pair[1], "{} < {}", pair[0], pair[1]);
            let encoded: Vec<Vec<u8>> = pair
                .iter()
                .map(|value| encode_tuple(std::slice::from_ref(value), &[Direction::Ascending]))
                .collect();
            assert!(encoded[0] < encoded[1], "encode({}) < encode({})", pair[0], pair[1]);
        }
    }
}

#[test]
fn malformed_keys_are_corruption_errors() {
    let asc = [Direction::Ascending];
    let cases: Vec<(&str, &[u8])> = vec![
        ("empty", &[]),
        ("unknown tag", &[0x42]),
        ("short int", &[0x04, 0x80, 0x00]),
        ("unterminated text", &[0x09, b'a']),
        ("bad escape", &[0x09, 0x00, 0x07]),
        ("invalid UTF-8", &[0x09, 0xc3, 0x28, 0x00, 0x01]),
        ("bad decimal digit", &[0x08, 0x80, 0x01, 0x0b, 0x00]),
        (
            "decimal too long",
            &[
                0x08, 0x80, 0x01, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
                2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0x00,
            ],
        ),
        ("decimal exponent out of range", &[0x08, 0xff, 0xff, 2, 0x00]),
    ];
    for (name, bytes) in cases {
        match decode_tuple(bytes, &asc) {
            Err(Error::Corruption(_)) => {}
            other => panic!("{name}: expected corruption, got {other:?}"),
        }
    }
}
