//! Errors: host-call failures made descriptive, config errors that name the field,
//! and the filter's own errors.

use std::fmt;

use sluice_abi::Status;

/// A status code returned by a host call, known or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    /// A status this ABI defines.
    Known(Status),
    /// A value outside the ABI's status enum (a host bug, reported as is).
    Unknown(u32),
}

impl StatusCode {
    /// Decodes a raw status.
    pub fn from_raw(raw: u32) -> StatusCode {
        Status::from_u32(raw).map_or(StatusCode::Unknown(raw), StatusCode::Known)
    }

    /// The ABI name of the status (`BAD_ARGUMENT`, ...).
    pub fn name(self) -> &'static str {
        match self {
            StatusCode::Known(s) => match s {
                Status::Ok => "OK",
                Status::NotFound => "NOT_FOUND",
                Status::BadArgument => "BAD_ARGUMENT",
                Status::SerializationFailure => "SERIALIZATION_FAILURE",
                Status::ParseFailure => "PARSE_FAILURE",
                Status::BadExpression => "BAD_EXPRESSION",
                Status::InvalidMemoryAccess => "INVALID_MEMORY_ACCESS",
                Status::Empty => "EMPTY",
                Status::CasMismatch => "CAS_MISMATCH",
                Status::ResultMismatch => "RESULT_MISMATCH",
                Status::InternalFailure => "INTERNAL_FAILURE",
                Status::BrokenConnection => "BROKEN_CONNECTION",
                Status::Unimplemented => "UNIMPLEMENTED",
            },
            StatusCode::Unknown(_) => "UNKNOWN_STATUS",
        }
    }

    /// What the status generally means.
    pub fn meaning(self) -> &'static str {
        match self {
            StatusCode::Known(s) => match s {
                Status::Ok => "success",
                Status::NotFound => "the key, map, buffer, queue, token or context does not exist here",
                Status::BadArgument => {
                    "the host rejected an argument, or the data is not available in this callback"
                }
                Status::SerializationFailure => "the host could not serialize the data",
                Status::ParseFailure => "the host could not parse the data",
                Status::BadExpression => "the property expression is invalid",
                Status::InvalidMemoryAccess => "a pointer or length given to the host is out of bounds",
                Status::Empty => "the queue is empty",
                Status::CasMismatch => "the value changed since it was read (compare-and-swap failed)",
                Status::ResultMismatch => "the result has an unexpected type",
                Status::InternalFailure => "the host failed, or refuses this call for this plugin",
                Status::BrokenConnection => "the connection is broken",
                Status::Unimplemented => "this host does not implement the call",
            },
            StatusCode::Unknown(_) => "the host returned a status outside the proxy-wasm ABI",
        }
    }

    /// The raw value.
    pub fn raw(self) -> u32 {
        match self {
            StatusCode::Known(s) => s.as_u32(),
            StatusCode::Unknown(v) => v,
        }
    }
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.raw())
    }
}

/// A host call that failed: which call, with what arguments, which status, and
/// what that means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError {
    call: &'static str,
    args: String,
    status: StatusCode,
    hint: Option<&'static str>,
}

impl HostError {
    /// Makes an error for `call` (the ABI import name) with a short rendering of
    /// its arguments.
    pub fn new(call: &'static str, args: impl Into<String>, raw_status: u32) -> HostError {
        HostError { call, args: args.into(), status: StatusCode::from_raw(raw_status), hint: None }
    }

    /// Adds a call-specific explanation.
    pub fn with_hint(mut self, hint: &'static str) -> HostError {
        self.hint = Some(hint);
        self
    }

    /// The ABI import that failed (`proxy_get_header_map_value`, ...).
    pub fn call(&self) -> &'static str {
        self.call
    }

    /// The status the host returned.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// True when the status is `status`.
    pub fn is(&self, status: Status) -> bool {
        self.status == StatusCode::Known(status)
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host call {}({}) returned {}: {}",
            self.call,
            self.args,
            self.status,
            self.status.meaning()
        )?;
        if let Some(hint) = self.hint {
            write!(f, " ({hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for HostError {}

/// A plugin configuration that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid plugin configuration at `{path}`: {message}")]
pub struct ConfigError {
    /// Where in the document the error is (`limits.burst`, `.` for the root).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// Makes an error about the field at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError { path: path.into(), message: message.into() }
    }
}

/// Any error a filter callback can return.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host call failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The plugin configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Data (JSON in shared data, a property value) could not be decoded.
    #[error("cannot decode {what}: {message}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// Why it failed.
        message: String,
    },
    /// The filter's own error.
    #[error("{0}")]
    Filter(String),
}

impl Error {
    /// A filter error with a message.
    pub fn msg(message: impl fmt::Display) -> Error {
        Error::Filter(message.to_string())
    }

    /// The host error, when this is one.
    pub fn as_host(&self) -> Option<&HostError> {
        match self {
            Error::Host(e) => Some(e),
            _ => None,
        }
    }
}

/// Shorthand for results of filter code.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_errors_say_which_call_and_what_it_means() {
        let e = HostError::new("proxy_get_header_map_value", "response headers, \"x\"", 2)
            .with_hint("response headers are readable in response callbacks and on_log");
        let s = e.to_string();
        assert!(s.contains("proxy_get_header_map_value(response headers, \"x\")"), "{s}");
        assert!(s.contains("BAD_ARGUMENT (2)"), "{s}");
        assert!(s.contains("response headers are readable"), "{s}");
        assert!(e.is(Status::BadArgument));
        let unknown = HostError::new("proxy_log", "", 99);
        assert!(unknown.to_string().contains("UNKNOWN_STATUS (99)"));
    }
}
