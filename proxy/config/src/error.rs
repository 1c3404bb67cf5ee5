//! Configuration errors: each names the source, the field and the reason.

use std::fmt;

/// One problem in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Field path, e.g. `listeners[0].virtual_hosts[1].routes[2].forward.cluster`.
    pub field: String,
    /// What is wrong, lowercase, without a trailing period.
    pub reason: String,
    /// 1-based line and column, when the parser knows them.
    pub location: Option<(usize, usize)>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.reason)?;
        } else {
            write!(f, "{}: {}", self.field, self.reason)?;
        }
        if let Some((line, column)) = self.location {
            write!(f, " (line {line}, column {column})")?;
        }
        Ok(())
    }
}

/// A rejected configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{source_name}: cannot read: {reason}")]
    Read {
        /// File name.
        source_name: String,
        /// The I/O error.
        reason: String,
    },
    /// The content is invalid; every problem found is listed.
    #[error("{source_name}: {}", render(problems))]
    Invalid {
        /// File name (or `<control-plane>`, `<inline>`).
        source_name: String,
        /// Problems, at least one.
        problems: Vec<Problem>,
    },
}

fn render(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let mut out = format!("{} problems:", many.len());
            for p in many {
                out.push_str("\n  - ");
                out.push_str(&p.to_string());
            }
            out
        }
    }
}

impl ConfigError {
    /// The problems found (empty for read errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }

    /// An error about one field, built outside this crate (e.g. while loading TLS files).
    pub fn field(source_name: &str, field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            source_name: source_name.to_owned(),
            problems: vec![Problem { field: field.into(), reason: reason.into(), location: None }],
        }
    }
}
