//! Order-preserving ("memcomparable") encoding of tuples of SQL values.
//!
//! A primary key or index key is a tuple of values, each ascending or descending. The encoding
//! maps tuples to byte strings so that comparing the bytes compares the tuples:
//! `encode(a) < encode(b)` iff `a < b` (under [`Value`]'s order, reversed per descending column),
//! and a tuple's encoding is a prefix of the encoding of every longer tuple that starts with it,
//! so a primary-key prefix becomes a range scan.
//!
//! Each value is a type tag followed by a payload:
//!
//! | value      | ascending encoding                                                        |
//! |------------|---------------------------------------------------------------------------|
//! | NULL       | `0x01` (NULL sorts first ascending, last descending)                      |
//! | BOOL       | `0x02` false, `0x03` true                                                 |
//! | INT        | `0x04`, 8 bytes big-endian with the sign bit flipped                      |
//! | DOUBLE     | `0x05`, IEEE bits: sign bit flipped if positive, all bits flipped if negative; `-0` as `+0`, every NaN as one NaN above `+inf` |
//! | DECIMAL    | `0x06` negative, `0x07` zero, `0x08` positive; then exponent and digits (below) |
//! | TEXT/BYTES | `0x09`/`0x0a`, bytes with `0x00` escaped as `0x00 0xff`, ended by `0x00 0x01` |
//! | TIMESTAMP  | `0x0b`, microseconds since the epoch like INT                             |
//!
//! A decimal `0.d₁d₂…dₙ × 10^e` (d₁ ≠ 0, dₙ ≠ 0) encodes `e` as a big-endian i16 with the sign
//! bit flipped, then each digit as the byte `d + 1`, then `0x00`; a negative decimal inverts
//! that payload. Equal decimals of different scale (`1.0`, `1.00`) encode the same.
//!
//! A descending value is its ascending encoding with every byte inverted. Text and bytes escape
//! `0x00` so that the terminator sorts below every continuation, which keeps prefixes first.
//!
//! Decoding needs the column directions, not the types: the tags say the types.

use std::cmp::Ordering;
use std::fmt;

use rust_decimal::Decimal;

use crate::{Result, corruption};

#[cfg(test)]
mod tests;

const TAG_NULL: u8 = 0x01;
const TAG_FALSE: u8 = 0x02;
const TAG_TRUE: u8 = 0x03;
const TAG_INT: u8 = 0x04;
const TAG_FLOAT: u8 = 0x05;
const TAG_DECIMAL_NEGATIVE: u8 = 0x06;
const TAG_DECIMAL_ZERO: u8 = 0x07;
const TAG_DECIMAL_POSITIVE: u8 = 0x08;
const TAG_TEXT: u8 = 0x09;
const TAG_BYTES: u8 = 0x0a;
const TAG_TIMESTAMP: u8 = 0x0b;

/// The escape byte in text and bytes payloads.
const ESCAPE: u8 = 0x00;
/// Follows [`ESCAPE`] for a literal `0x00` byte.
const ESCAPED_ZERO: u8 = 0xff;
/// Follows [`ESCAPE`] at the end of a payload.
const TERMINATOR: u8 = 0x01;

/// A SQL value as stored in keys.
///
/// Values are totally ordered: first by type (in the tag order of the module docs), then by
/// value. DOUBLE uses a total order in which `-0.0 == 0.0` and NaN is greater than everything,
/// and DECIMAL compares numerically (`1.0 == 1.00`); equality follows the order.
#[derive(Clone, Debug)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// BOOL.
    Bool(bool),
    /// INT / BIGINT.
    Int(i64),
    /// DOUBLE PRECISION.
    Float(f64),
    /// DECIMAL / NUMERIC.
    Decimal(Decimal),
    /// TEXT / VARCHAR.
    Text(String),
    /// BYTEA.
    Bytes(Vec<u8>),
    /// TIMESTAMP, in microseconds since the Unix epoch (PostgreSQL's resolution).
    Timestamp(i64),
}

impl Value {
    /// Returns the rank of the value's type in the cross-type order.
    fn type_rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int(_) => 2,
            Value::Float(_) => 3,
            Value::Decimal(_) => 4,
            Value::Text(_) => 5,
            Value::Bytes(_) => 6,
            Value::Timestamp(_) => 7,
        }
    }
}

/// Returns the float with `-0.0` mapped to `0.0` and every NaN to one NaN.
fn canonical_float(float: f64) -> f64 {
    if float.is_nan() {
        f64::NAN
    } else if float == 0.0 {
        0.0
    } else {
        float
    }
}

/// Returns the order-preserving bits of a float.
fn float_key_bits(float: f64) -> u64 {
    let bits = canonical_float(float).to_bits();
    if bits >> 63 == 1 { !bits } else { bits ^ (1 << 63) }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => float_key_bits(*a).cmp(&float_key_bits(*b)),
            (Value::Decimal(a), Value::Decimal(b)) => a.cmp(b),
            (Value::Text(a), Value::Text(b)) => a.cmp(b),
            (Value::Bytes(a), Value::Bytes(b)) => a.cmp(b),
            (Value::Timestamp(a), Value::Timestamp(b)) => a.cmp(b),
            _ => self.type_rank().cmp(&other.type_rank()),
        }
    }
}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => write!(f, "NULL"),
            Value::Bool(value) => write!(f, "{value}"),
            Value::Int(value) => write!(f, "{value}"),
            Value::Float(value) => write!(f, "{value:?}"),
            Value::Decimal(value) => write!(f, "{value}"),
            Value::Text(value) => write!(f, "{value:?}"),
            Value::Bytes(value) => {
                write!(f, "x'{}'", value.iter().map(|b| format!("{b:02x}")).collect::<String>())
            }
            Value::Timestamp(micros) => write!(f, "timestamp({micros})"),
        }
    }
}

/// The sort direction of one column of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Smallest first.
    Ascending,
    /// Largest first.
    Descending,
}

impl Direction {
    /// Returns the byte mask applied to this direction's encoding.
    fn mask(self) -> u8 {
        match self {
            Direction::Ascending => 0x00,
            Direction::Descending => 0xff,
        }
    }
}

/// Appends the encoding of `value` in `direction` to `out`.
pub fn encode_value(value: &Value, direction: Direction, out: &mut Vec<u8>) {
    let start = out.len();
    match value {
        Value::Null => out.push(TAG_NULL),
        Value::Bool(false) => out.push(TAG_FALSE),
        Value::Bool(true) => out.push(TAG_TRUE),
        Value::Int(int) => {
            out.push(TAG_INT);
            out.extend_from_slice(&((*int as u64) ^ (1 << 63)).to_be_bytes());
        }
        Value::Float(float) => {
            out.push(TAG_FLOAT);
            out.extend_from_slice(&float_key_bits(*float).to_be_bytes());
        }
        Value::Decimal(decimal) => encode_decimal(*decimal, out),
        Value::Text(text) => {
            out.push(TAG_TEXT);
            encode_escaped(text.as_bytes(), out);
        }
        Value::Bytes(bytes) => {
            out.push(TAG_BYTES);
            encode_escaped(bytes, out);
        }
        Value::Timestamp(micros) => {
            out.push(TAG_TIMESTAMP);
            out.extend_from_slice(&((*micros as u64) ^ (1 << 63)).to_be_bytes());
        }
    }
    if direction == Direction::Descending {
        out[start..].iter_mut().for_each(|byte| *byte = !*byte);
    }
}

/// Returns the encoding of a tuple; `directions` gives each column's direction.
///
/// # Panics
///
/// If `values` and `directions` differ in length: the schema defines both.
pub fn encode_tuple(values: &[Value], directions: &[Direction]) -> Vec<u8> {
    assert_eq!(values.len(), directions.len(), "a key needs one direction per column");
    let mut out = Vec::new();
    for (value, direction) in values.iter().zip(directions) {
        encode_value(value, *direction, &mut out);
    }
    out
}

/// Decodes a tuple of `directions.len()` values from the start of `bytes`, returning the values
/// and the number of bytes read (a key may continue with other data, e.g. an MVCC timestamp).
///
/// # Errors
///
/// [`crate::Error::Corruption`] if the bytes are not such an encoding.
pub fn decode_tuple(bytes: &[u8], directions: &[Direction]) -> Result<(Vec<Value>, usize)> {
    let mut reader = Reader { bytes, position: 0, mask: 0 };
    let mut values = Vec::with_capacity(directions.len());
    for direction in directions {
        reader.mask = direction.mask();
        values.push(reader.value()?);
    }
    Ok((values, reader.position))
}

/// Appends `bytes` with `0x00` escaped, followed by the terminator.
pub fn encode_escaped(bytes: &[u8], out: &mut Vec<u8>) {
    for &byte in bytes {
        if byte == ESCAPE {
            out.extend_from_slice(&[ESCAPE, ESCAPED_ZERO]);
        } else {
            out.push(byte);
        }
    }
    out.extend_from_slice(&[ESCAPE, TERMINATOR]);
}

/// Decodes bytes written by [`encode_escaped`] from the start of `bytes`, returning them and the
/// number of bytes read.
///
/// # Errors
///
/// [`crate::Error::Corruption`] if the escaping is malformed or unterminated.
pub fn decode_escaped(bytes: &[u8]) -> Result<(Vec<u8>, usize)> {
    let mut reader = Reader { bytes, position: 0, mask: 0 };
    let decoded = reader.escaped()?;
    Ok((decoded, reader.position))
}

/// Appends a decimal's tag and payload (ascending).
fn encode_decimal(decimal: Decimal, out: &mut Vec<u8>) {
    if decimal.is_zero() {
        out.push(TAG_DECIMAL_ZERO);
        return;
    }
    let negative = decimal.is_sign_negative();
    let digits = decimal.mantissa().unsigned_abs().to_string();
    // value = 0.digits × 10^exponent, counting trailing zeros of the mantissa as digits.
    let exponent = digits.len() as i64 - i64::from(decimal.scale());
    let significant = digits.trim_end_matches('0');
    let mut payload = Vec::with_capacity(significant.len() + 3);
    payload.extend_from_slice(&((exponent as i16 as u16) ^ 0x8000).to_be_bytes());
    payload.extend(significant.bytes().map(|digit| digit - b'0' + 1));
    payload.push(0x00);
    if negative {
        out.push(TAG_DECIMAL_NEGATIVE);
        out.extend(payload.iter().map(|byte| !byte));
    } else {
        out.push(TAG_DECIMAL_POSITIVE);
        out.extend(payload);
    }
}

/// Reads values from bytes, un-inverting them with `mask`.
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
    mask: u8,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8> {
        let byte =
            self.bytes.get(self.position).ok_or_else(|| corruption!("key ends inside a value"))?;
        self.position += 1;
        Ok(byte ^ self.mask)
    }

    fn u64(&mut self) -> Result<u64> {
        let mut buffer = [0u8; 8];
        for byte in &mut buffer {
            *byte = self.byte()?;
        }
        Ok(u64::from_be_bytes(buffer))
    }

    fn escaped(&mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            match self.byte()? {
                ESCAPE => match self.byte()? {
                    ESCAPED_ZERO => out.push(0x00),
                    TERMINATOR => return Ok(out),
                    other => return Err(corruption!("invalid escape 0x00 0x{other:02x} in key")),
                },
                byte => out.push(byte),
            }
        }
    }

    fn decimal(&mut self, negative: bool) -> Result<Decimal> {
        let sign_mask = if negative { 0xff } else { 0x00 };
        let exponent = i64::from(
            (u16::from_be_bytes([self.byte()? ^ sign_mask, self.byte()? ^ sign_mask]) ^ 0x8000)
                as i16,
        );
        let mut mantissa: i128 = 0;
        let mut digit_count: i64 = 0;
        loop {
            let byte = self.byte()? ^ sign_mask;
            if byte == 0x00 {
                break;
            }
            if !(1..=10).contains(&byte) || digit_count >= 38 {
                return Err(corruption!("invalid decimal digit in key"));
            }
            mantissa = mantissa * 10 + i128::from(byte - 1);
            digit_count += 1;
        }
        let mut scale = digit_count - exponent;
        while scale < 0 {
            mantissa =
                mantissa.checked_mul(10).ok_or_else(|| corruption!("decimal in key overflows"))?;
            scale += 1;
        }
        if negative {
            mantissa = -mantissa;
        }
        let scale =
            u32::try_from(scale).map_err(|_| corruption!("decimal scale in key out of range"))?;
        Decimal::try_from_i128_with_scale(mantissa, scale)
            .map_err(|error| corruption!("decimal in key: {error}"))
    }

    fn value(&mut self) -> Result<Value> {
        Ok(match self.byte()? {
            TAG_NULL => Value::Null,
            TAG_FALSE => Value::Bool(false),
            TAG_TRUE => Value::Bool(true),
            TAG_INT => Value::Int((self.u64()? ^ (1 << 63)) as i64),
            TAG_FLOAT => {
                let bits = self.u64()?;
                let bits = if bits >> 63 == 1 { bits ^ (1 << 63) } else { !bits };
                Value::Float(f64::from_bits(bits))
            }
            TAG_DECIMAL_NEGATIVE => Value::Decimal(self.decimal(true)?),
            TAG_DECIMAL_ZERO => Value::Decimal(Decimal::ZERO),
            TAG_DECIMAL_POSITIVE => Value::Decimal(self.decimal(false)?),
            TAG_TEXT => {
                let bytes = self.escaped()?;
                Value::Text(
                    String::from_utf8(bytes)
                        .map_err(|_| corruption!("text in key is not UTF-8"))?,
                )
            }
            TAG_BYTES => Value::Bytes(self.escaped()?),
            TAG_TIMESTAMP => Value::Timestamp((self.u64()? ^ (1 << 63)) as i64),
            tag => return Err(corruption!("unknown value tag 0x{tag:02x} in key")),
        })
    }
}
