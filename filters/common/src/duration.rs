//! Durations in filter configs: a number of milliseconds (`250`) or a string with
//! a unit (`"250ms"`, `"2s"`, `"1.5s"`, `"5m"`, `"1h"`).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A config duration (see the module docs for the accepted forms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl Dur {
    /// From milliseconds.
    pub const fn from_millis(ms: u64) -> Dur {
        Dur(Duration::from_millis(ms))
    }

    /// From seconds.
    pub const fn from_secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }

    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

/// The longest duration accepted (a day): anything longer in a filter config is a
/// typo.
pub const MAX: Duration = Duration::from_secs(24 * 3600);

/// Parses `250ms`, `2s`, `1.5s`, `5m`, `1h` or a bare number of milliseconds.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(format!("invalid duration {s:?}: expected a number and a unit (ms, s, m, h)"));
    }
    let value: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}: bad number"))?;
    let scale_ms = match unit.trim() {
        "" | "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        other => return Err(format!("invalid duration {s:?}: unknown unit {other:?} (ms, s, m, h)")),
    };
    let ms = value * scale_ms;
    if !ms.is_finite() || ms > MAX.as_millis() as f64 {
        return Err(format!("invalid duration {s:?}: longer than a day"));
    }
    Ok(Duration::from_micros((ms * 1000.0) as u64))
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration: milliseconds or a string like \"250ms\", \"2s\", \"5m\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                let d = Duration::from_millis(v);
                if d > MAX { Err(E::custom("duration longer than a day")) } else { Ok(Dur(d)) }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v).map_err(|_| E::custom("negative duration")).and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                if !(0.0..=MAX.as_millis() as f64).contains(&v) {
                    return Err(E::custom("duration out of range"));
                }
                Ok(Dur(Duration::from_micros((v * 1000.0) as u64)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse(v).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", self.0.as_millis()))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("40"), Ok(Duration::from_millis(40)));
        assert!(parse("").is_err());
        assert!(parse("s").is_err());
        assert!(parse("3d").unwrap_err().contains("unknown unit"));
        assert!(parse("25h").unwrap_err().contains("longer than a day"));
        assert!(parse("1.2.3s").is_err());
    }

    #[test]
    fn deserializes_numbers_and_strings() {
        let d: Dur = serde_json::from_str("150").unwrap();
        assert_eq!(d.get(), Duration::from_millis(150));
        let d: Dur = serde_json::from_str("\"3s\"").unwrap();
        assert_eq!(d.get(), Duration::from_secs(3));
        assert!(serde_json::from_str::<Dur>("-1").is_err());
        assert!(serde_json::from_str::<Dur>("true").is_err());
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = parse(&s);
        }

        #[test]
        fn millis_round_trip(ms in 0u64..86_400_000) {
            prop_assert_eq!(parse(&format!("{ms}ms")), Ok(Duration::from_millis(ms)));
        }
    }
}
