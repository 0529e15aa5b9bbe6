//! A JSON parser for token headers and payloads that refuses duplicate object keys.
//!
//! ## Why
//! `serde_json::Value` keeps the last of two equal keys. Another parser (a destination,
//! an auditor) may keep the first, so a token with two `sub` or `aud` values could mean
//! one thing to lanyard and another elsewhere. Refusing the token is the only safe answer.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why strict parsing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StrictJsonError {
    /// Some object repeats a key.
    Duplicate,
    /// Not valid JSON (or nested too deeply).
    Invalid,
}

/// Parse `bytes` as one JSON value, refusing duplicate keys at every object level.
pub(crate) fn parse_strict(bytes: &[u8]) -> Result<Value, StrictJsonError> {
    let dup = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = StrictSeed { dup: &dup }.deserialize(&mut de);
    let value = match parsed {
        Ok(v) => v,
        Err(_) if dup.get() => return Err(StrictJsonError::Duplicate),
        Err(_) => return Err(StrictJsonError::Invalid),
    };
    de.end().map_err(|_| StrictJsonError::Invalid)?;
    Ok(value)
}

#[derive(Clone, Copy)]
struct StrictSeed<'a> {
    dup: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for StrictSeed<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                self.dup.set(true);
                return Err(de::Error::custom("duplicate key"));
            }
            let v = map.next_value_seed(self)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parses_ordinary_json() {
        let v = parse_strict(br#"{"a":[1,-2,3.5,"x",null,true,{"b":{}}]}"#).unwrap();
        assert_eq!(v, json!({"a": [1, -2, 3.5, "x", null, true, {"b": {}}]}));
    }

    #[test]
    fn refuses_duplicates_at_any_level() {
        for bad in [
            r#"{"sub":"a","sub":"b"}"#,
            r#"{"x":{"aud":1,"aud":2}}"#,
            r#"{"x":[{"k":1,"k":1}]}"#,
            r#"{"exp":1,"\u0065xp":2}"#,
        ] {
            assert_eq!(
                parse_strict(bad.as_bytes()),
                Err(StrictJsonError::Duplicate),
                "{bad}"
            );
        }
    }

    #[test]
    fn refuses_garbage_and_trailing_data() {
        for bad in [&b"{"[..], b"{} {}", b"nul", b"\xff", b""] {
            assert_eq!(parse_strict(bad), Err(StrictJsonError::Invalid));
        }
        let deep = "[".repeat(1000) + &"]".repeat(1000);
        assert_eq!(parse_strict(deep.as_bytes()), Err(StrictJsonError::Invalid));
    }
}
