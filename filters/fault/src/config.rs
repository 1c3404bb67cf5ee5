//! The fault filter's configuration (see the README for the YAML form).

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_filter_common::{Dur, PathMatch, matching};
use sluice_sdk::{Error, GrpcStatus};

use crate::AbortWith;

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Rules, first match wins.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Per-request faults from request headers.
    #[serde(default)]
    pub header_faults: HeaderFaults,
    /// Timer granularity of delays (default 10ms).
    #[serde(default = "default_tick")]
    pub tick: Dur,
    /// No new fault while this many requests are delayed in this VM.
    #[serde(default)]
    pub max_active_faults: Option<u32>,
}

fn default_tick() -> Dur {
    Dur::from_millis(10)
}

/// Which requests get which fault.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A name for logs.
    #[serde(default)]
    pub name: Option<String>,
    /// Route names (`xds.route_name`); empty = every route.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Paths; empty = every path.
    #[serde(default)]
    pub paths: Vec<PathMatch>,
    /// Request headers that must be present with these values (`*`: any value).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The delay to inject.
    #[serde(default)]
    pub delay: Option<Delay>,
    /// The abort to inject.
    #[serde(default)]
    pub abort: Option<Abort>,
}

impl Rule {
    pub(crate) fn applies(&self, route: Option<&str>, path: &str) -> bool {
        let route_ok = self.routes.is_empty() || route.is_some_and(|r| self.routes.iter().any(|x| x == r));
        route_ok && matching::any(&self.paths, path)
    }
}

/// A fixed delay for a percentage of requests.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delay {
    /// How long.
    pub fixed: Dur,
    /// Percentage of matching requests (0-100, default 100).
    #[serde(default = "hundred")]
    pub percentage: f64,
}

/// An abort for a percentage of requests.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abort {
    /// HTTP status of the local reply.
    #[serde(default)]
    pub http_status: Option<u16>,
    /// gRPC status of the local reply (used for `application/grpc` requests, or
    /// for all requests when `http_status` is unset).
    #[serde(default)]
    pub grpc_status: Option<u32>,
    /// Percentage of matching requests (0-100, default 100).
    #[serde(default = "hundred")]
    pub percentage: f64,
    /// Body (HTTP) or message (gRPC) of the reply.
    #[serde(default)]
    pub body: Option<String>,
}

impl Abort {
    pub(crate) fn pick(&self, grpc_request: bool) -> Option<AbortWith> {
        let grpc = self.grpc_status.and_then(GrpcStatus::from_u32);
        match (grpc, self.http_status) {
            (Some(g), None) => Some(AbortWith::Grpc(g, self.message())),
            (Some(g), Some(_)) if grpc_request => Some(AbortWith::Grpc(g, self.message())),
            (_, Some(s)) => {
                Some(AbortWith::Http(s, self.body.clone().unwrap_or_else(|| "fault filter abort\n".into())))
            }
            (None, None) => None,
        }
    }

    fn message(&self) -> String {
        self.body.clone().unwrap_or_else(|| "fault filter abort".into())
    }
}

fn hundred() -> f64 {
    100.0
}

/// Faults asked for by the request itself (for tests and chaos tooling; enable
/// only where clients are trusted).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderFaults {
    /// Off by default.
    pub enabled: bool,
    /// Cap on a header-requested delay (default 10s).
    pub max_delay: Dur,
    /// Delay in milliseconds (default `x-fault-delay`).
    pub delay_header: String,
    /// HTTP status to abort with (default `x-fault-abort`).
    pub abort_header: String,
    /// gRPC status to abort with (default `x-fault-abort-grpc`).
    pub abort_grpc_header: String,
    /// Percentage for the delay (default `x-fault-delay-percentage`; absent = 100).
    pub delay_percentage_header: String,
    /// Percentage for the abort (default `x-fault-abort-percentage`; absent = 100).
    pub abort_percentage_header: String,
}

impl Default for HeaderFaults {
    fn default() -> Self {
        HeaderFaults {
            enabled: false,
            max_delay: Dur::from_secs(10),
            delay_header: "x-fault-delay".into(),
            abort_header: "x-fault-abort".into(),
            abort_grpc_header: "x-fault-abort-grpc".into(),
            delay_percentage_header: "x-fault-delay-percentage".into(),
            abort_percentage_header: "x-fault-abort-percentage".into(),
        }
    }
}

impl Config {
    /// Checks what serde cannot: percentages, statuses, non-empty rules.
    pub fn validate(&self) -> Result<(), Error> {
        for (i, rule) in self.rules.iter().enumerate() {
            let at = |field: &str| format!("rules[{i}]{field}");
            if rule.delay.is_none() && rule.abort.is_none() {
                return Err(Error::msg(format!("{}: a rule needs a delay or an abort", at(""))));
            }
            if let Some(d) = &rule.delay {
                check_percent(d.percentage, &at(".delay.percentage"))?;
            }
            if let Some(a) = &rule.abort {
                check_percent(a.percentage, &at(".abort.percentage"))?;
                if a.http_status.is_none() && a.grpc_status.is_none() {
                    return Err(Error::msg(format!("{}: set http_status or grpc_status", at(".abort"))));
                }
                if let Some(s) = a.http_status
                    && !(200..600).contains(&s)
                {
                    return Err(Error::msg(format!(
                        "{}: {s} is not an HTTP status (200-599)",
                        at(".abort.http_status")
                    )));
                }
                if let Some(g) = a.grpc_status
                    && !(1..=16).contains(&g)
                {
                    return Err(Error::msg(format!(
                        "{}: {g} is not a gRPC error status (1-16)",
                        at(".abort.grpc_status")
                    )));
                }
            }
        }
        if self.tick.get().is_zero() {
            return Err(Error::msg("tick must be positive"));
        }
        Ok(())
    }

    /// True when some request can be delayed (the timer is needed).
    pub fn may_delay(&self) -> bool {
        self.header_faults.enabled || self.rules.iter().any(|r| r.delay.is_some())
    }
}

fn check_percent(p: f64, at: &str) -> Result<(), Error> {
    if (0.0..=100.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::msg(format!("{at}: {p} is not a percentage (0-100)")))
    }
}
