//! Host services that belong to no context: clock, log level, foreign functions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_abi::LogLevel;

use crate::error::HostError;
use crate::sys;

/// The host's wall clock (`proxy_get_current_time_nanoseconds`); under the test kit,
/// its simulated clock.
pub fn now() -> Result<SystemTime, HostError> {
    let nanos = sys::get_current_time_nanos().map_err(sys::fail("proxy_get_current_time_nanoseconds", ""))?;
    Ok(UNIX_EPOCH + Duration::from_nanos(nanos))
}

/// The host's current log level: messages below it are dropped by the host.
pub fn log_level() -> Result<LogLevel, HostError> {
    let raw = sys::get_log_level().map_err(sys::fail("proxy_get_log_level", ""))?;
    // Hosts may report "off" as 6; treat anything above CRITICAL as CRITICAL.
    Ok(LogLevel::from_u32(raw).unwrap_or(LogLevel::Critical))
}

/// Calls a host extension by name (Envoy: `set_envoy_filter_state`, ...). `None` is
/// an empty result.
pub fn call_foreign_function(name: &str, args: &[u8]) -> Result<Option<Vec<u8>>, HostError> {
    sys::call_foreign_function(name.as_bytes(), args)
        .map_err(sys::fail("proxy_call_foreign_function", format!("{name:?}")))
}

/// The status of the callout being reported (`proxy_get_status`).
pub(crate) fn status() -> Result<(u32, String), HostError> {
    let (code, msg) = sys::get_status().map_err(sys::fail("proxy_get_status", ""))?;
    Ok((code, msg.map(|m| String::from_utf8_lossy(&m).into_owned()).unwrap_or_default()))
}
