//! The access log: one line per request, text or JSON, written when the
//! response ends (so bytes and durations are final).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use sluice_config::AccessLogFormat;

pub use sluice_filter::RequestId;

/// What is known about a request, filled in as it goes.
#[derive(Debug, Clone)]
pub struct RequestLog {
    /// Request id.
    pub request_id: RequestId,
    /// Listener name.
    pub listener: Arc<str>,
    /// Downstream peer.
    pub downstream: SocketAddr,
    /// Method.
    pub method: http::Method,
    /// Authority.
    pub authority: String,
    /// Path and query.
    pub path: String,
    /// Protocol.
    pub protocol: http::Version,
    /// Matched route.
    pub route: Option<Arc<str>>,
    /// Chosen cluster.
    pub cluster: Option<Arc<str>>,
    /// Upstream address of the last attempt.
    pub upstream: Option<SocketAddr>,
    /// Attempts made upstream.
    pub attempts: u32,
    /// Status sent downstream.
    pub status: u16,
    /// Reason, for proxy-made replies.
    pub reason: Option<&'static str>,
    /// Wall-clock start.
    pub start_wall: SystemTime,
    /// Monotonic start.
    pub start: Instant,
    /// Time to upstream response headers, in µs.
    pub upstream_us: Option<u64>,
    /// User agent.
    pub user_agent: Option<String>,
}

impl RequestLog {
    /// Writes the line for a finished request.
    pub fn emit(&self, format: AccessLogFormat, response_bytes: u64, completed: bool) {
        let duration_us = self.start.elapsed().as_micros() as u64;
        let line = match format {
            AccessLogFormat::Off => return,
            AccessLogFormat::Json => {
                let v = serde_json::json!({
                    "time": humantime_rfc3339(self.start_wall),
                    "request_id": self.request_id.as_str(),
                    "listener": &*self.listener,
                    "downstream": self.downstream.to_string(),
                    "method": self.method.as_str(),
                    "authority": self.authority,
                    "path": self.path,
                    "protocol": format!("{:?}", self.protocol),
                    "route": self.route.as_deref(),
                    "cluster": self.cluster.as_deref(),
                    "upstream": self.upstream.map(|a| a.to_string()),
                    "attempts": self.attempts,
                    "status": self.status,
                    "reason": self.reason,
                    "response_bytes": response_bytes,
                    "duration_us": duration_us,
                    "upstream_us": self.upstream_us,
                    "completed": completed,
                    "user_agent": self.user_agent,
                });
                v.to_string()
            }
            AccessLogFormat::Text => format!(
                "[{}] \"{} {} {:?}\" {} {} {} {}us {} route={} cluster={} upstream={} id={} ua={:?}",
                humantime_rfc3339(self.start_wall),
                self.method,
                self.path,
                self.protocol,
                self.status,
                self.reason.unwrap_or("-"),
                response_bytes,
                duration_us,
                self.authority,
                self.route.as_deref().unwrap_or("-"),
                self.cluster.as_deref().unwrap_or("-"),
                self.upstream.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                self.request_id,
                self.user_agent.as_deref().unwrap_or("-"),
            ),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
    }
}

fn humantime_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, dd) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_787), (2026, 11, 30));
    }
}
