//! Logging through the host (`proxy_log`). Use the macros: [`info!`](crate::info),
//! [`warn!`](crate::warn), [`error!`](macro@crate::error), [`debug!`](crate::debug),
//! [`trace!`](crate::trace), [`critical!`](crate::critical).

pub use sluice_abi::LogLevel;

use crate::sys;

/// Logs `message` at `level`. A host that refuses the message is ignored: logging
/// never fails a request.
pub fn log(level: LogLevel, message: &str) {
    let _ = sys::log(level.as_u32(), message);
}

/// Logs at trace level, `format!` style.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => { $crate::log::log($crate::log::LogLevel::Trace, &::std::format!($($arg)*)) };
}

/// Logs at debug level, `format!` style.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::log($crate::log::LogLevel::Debug, &::std::format!($($arg)*)) };
}

/// Logs at info level, `format!` style.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::log($crate::log::LogLevel::Info, &::std::format!($($arg)*)) };
}

/// Logs at warn level, `format!` style.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::log($crate::log::LogLevel::Warn, &::std::format!($($arg)*)) };
}

/// Logs at error level, `format!` style.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::log($crate::log::LogLevel::Error, &::std::format!($($arg)*)) };
}

/// Logs at critical level, `format!` style.
#[macro_export]
macro_rules! critical {
    ($($arg:tt)*) => { $crate::log::log($crate::log::LogLevel::Critical, &::std::format!($($arg)*)) };
}
