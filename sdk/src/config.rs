//! Typed plugin configuration: JSON into a `serde` type, with errors that name the
//! offending field.

use serde::de::DeserializeOwned;

use crate::error::ConfigError;

/// Decodes a JSON plugin configuration.
///
/// Empty input means "no configuration": it is read as `null` (so `()` and
/// `Option<T>` accept it) and, failing that, as `{}` (so a struct whose fields all
/// have defaults accepts it). Errors carry the path of the field
/// (`limits.burst`, `routes[2].path`, `.` for the document itself).
pub fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        if let Ok(v) = parse::<T>(b"null") {
            return Ok(v);
        }
        return parse(b"{}")
            .map_err(|e| ConfigError::new(e.path, format!("{} (no configuration was given)", e.message)));
    }
    parse(bytes)
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::new(path, e.into_inner().to_string())
    })?;
    Ok(value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        burst: u32,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Cfg {
        #[serde(default)]
        name: String,
        limits: Option<Limits>,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default)]
    struct AllDefault {
        header: String,
    }

    #[test]
    fn errors_name_the_field() {
        let e = from_json::<Cfg>(br#"{"limits": {"burst": "ten"}}"#).unwrap_err();
        assert_eq!(e.path, "limits.burst");
        assert!(e.message.contains("invalid type"), "{e}");
        assert!(e.to_string().starts_with("invalid plugin configuration at `limits.burst`"), "{e}");
        let e = from_json::<Cfg>(br#"{"limits": {"burst": 1, "bust": 2}}"#).unwrap_err();
        assert!(e.message.contains("unknown field `bust`"), "{e}");
        let e = from_json::<Cfg>(b"{not json").unwrap_err();
        assert!(e.message.contains("key must be a string"), "{e}");
    }

    #[test]
    fn empty_config_is_null_or_empty_object() {
        from_json::<()>(b"").unwrap();
        assert_eq!(from_json::<Option<Limits>>(b"").unwrap(), None);
        assert_eq!(from_json::<AllDefault>(b" ").unwrap(), AllDefault::default());
        let e = from_json::<Limits>(b"").unwrap_err();
        assert!(e.message.contains("missing field `burst`"), "{e}");
        assert!(e.message.contains("no configuration was given"), "{e}");
    }
}
