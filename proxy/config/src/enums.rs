//! Enums written either as a bare name or as a one-key map with settings
//! (`reload` or `{ reload: { base: 1s } }`), with errors that list the choices.

use serde::Deserialize;
use serde::de::{Deserializer, Error};
use serde_yaml_ng::Value;

/// Deserializes a name-or-one-key-map enum.
pub(crate) fn one_of<'de, D, T>(
    d: D,
    expecting: &str,
    by_name: impl Fn(&str) -> Option<T>,
    by_key: impl Fn(&str, Value) -> Option<Result<T, serde_yaml_ng::Error>>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    match Value::deserialize(d)? {
        Value::String(s) => {
            by_name(&s).ok_or_else(|| D::Error::custom(format!("unknown value `{s}`, expected {expecting}")))
        }
        Value::Mapping(m) if m.len() == 1 => {
            let Some((k, v)) = m.into_iter().next() else {
                return Err(D::Error::custom(format!("expected {expecting}")));
            };
            let key = k.as_str().unwrap_or_default().to_owned();
            match by_key(&key, v) {
                Some(r) => r.map_err(|e| D::Error::custom(format!("{key}: {e}"))),
                None => Err(D::Error::custom(format!("unknown key `{key}`, expected {expecting}"))),
            }
        }
        _ => Err(D::Error::custom(format!("expected {expecting}"))),
    }
}
