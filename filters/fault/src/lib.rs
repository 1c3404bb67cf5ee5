//! Sluice's fault-injection filter: delays and/or aborts (an HTTP status or a gRPC
//! status) for a percentage of requests, selected per route (`xds.route_name`),
//! path and request headers, with Envoy-style per-request overrides from
//! `x-fault-*` headers. The configuration is documented in this crate's README.
//!
//! It is not a traffic shaper (no bandwidth limits) and does not inject
//! response-side faults; a delay holds the request in the proxy, so the upstream
//! sees it late and never sees aborted ones.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod config;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use sluice_filter_common::random;
use sluice_sdk::metrics::{Counter, Gauge};
use sluice_sdk::{Action, Error, GrpcStatus, Http, HttpContext, Root, RootContext, StreamType};

pub use config::{Abort, Config, Delay, HeaderFaults, Rule};

/// Requests held by a delay: (HTTP context id, when to resume).
type Pending = Rc<RefCell<Vec<(u32, SystemTime)>>>;

#[derive(Clone, Copy)]
struct Metrics {
    delays: Counter,
    aborts: Counter,
    active: Gauge,
}

/// The plugin: configuration, the delayed requests, the timer.
#[derive(Default)]
pub struct FaultRoot {
    config: Option<Rc<Config>>,
    pending: Pending,
    metrics: Option<Metrics>,
}

impl RootContext for FaultRoot {
    type Config = Config;
    type Http = Fault;

    fn on_configure(&mut self, root: &mut Root, config: Config) -> Result<(), Error> {
        config.validate()?;
        self.metrics = Some(Metrics {
            delays: Counter::new("fault_delays_injected")?,
            aborts: Counter::new("fault_aborts_injected")?,
            active: Gauge::new("fault_active_delays")?,
        });
        let period = if config.may_delay() { config.tick.get() } else { Duration::ZERO };
        root.set_tick_period(period)?;
        random::seed(now_nanos());
        sluice_sdk::info!(
            "fault configured: {} rules, header faults {}",
            config.rules.len(),
            config.header_faults.enabled
        );
        self.config = Some(Rc::new(config));
        Ok(())
    }

    fn new_http(&mut self, _root: &mut Root) -> Fault {
        Fault {
            config: self.config.clone(),
            pending: self.pending.clone(),
            metrics: self.metrics,
            delayed: false,
        }
    }

    fn on_tick(&mut self, root: &mut Root) -> Result<(), Error> {
        let now = sluice_sdk::host::now()?;
        let due: Vec<u32> = {
            let mut pending = self.pending.borrow_mut();
            let due = pending.iter().filter(|(_, at)| *at <= now).map(|(id, _)| *id).collect();
            pending.retain(|(_, at)| *at > now);
            due
        };
        for id in due {
            // The request may have gone away (client reset); nothing to resume then.
            if let Err(e) = root.resume_http(id, StreamType::HttpRequest) {
                sluice_sdk::debug!("fault: delayed request {id} is gone: {e}");
            }
        }
        if let Some(m) = self.metrics {
            m.active.set(i64::try_from(self.pending.borrow().len()).unwrap_or(i64::MAX))?;
        }
        Ok(())
    }
}

fn now_nanos() -> u64 {
    sluice_sdk::host::now()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What was decided for one request.
#[derive(Debug, Clone, PartialEq, Default)]
struct Decision {
    delay: Option<Duration>,
    abort: Option<AbortWith>,
}

#[derive(Debug, Clone, PartialEq)]
enum AbortWith {
    Http(u16, String),
    Grpc(GrpcStatus, String),
}

/// One request.
pub struct Fault {
    config: Option<Rc<Config>>,
    pending: Pending,
    metrics: Option<Metrics>,
    delayed: bool,
}

impl Fault {
    fn decide(&self, config: &Config, http: &Http) -> Result<Decision, Error> {
        let req = http.request();
        let path = req.path()?.unwrap_or_default();
        let route = if config.rules.iter().any(|r| !r.routes.is_empty()) {
            sluice_sdk::properties::route_name()?
        } else {
            None
        };
        let grpc = req.header("content-type")?.is_some_and(|c| c.starts_with("application/grpc"));
        let mut decision = Decision::default();
        let mut rule_found = None;
        for rule in &config.rules {
            if !rule.applies(route.as_deref(), &path) {
                continue;
            }
            let mut headers_match = true;
            for (name, want) in &rule.headers {
                let got = req.header(name)?;
                headers_match &= match got {
                    Some(v) => want == "*" || v == *want,
                    None => false,
                };
            }
            if headers_match {
                rule_found = Some(rule);
                break;
            }
        }
        if let Some(rule) = rule_found {
            if let Some(d) = &rule.delay
                && random::chance(d.percentage)
            {
                decision.delay = Some(d.fixed.get());
            }
            if let Some(a) = &rule.abort
                && random::chance(a.percentage)
            {
                decision.abort = a.pick(grpc);
            }
        }
        let h = &config.header_faults;
        if h.enabled {
            if let Some(ms) = req.header(&h.delay_header)?.and_then(|v| v.trim().parse::<u64>().ok()) {
                let pct = header_percent(http, &h.delay_percentage_header)?;
                if random::chance(pct) {
                    decision.delay = Some(Duration::from_millis(ms).min(h.max_delay.get()));
                }
            }
            let abort_http = req.header(&h.abort_header)?.and_then(|v| v.trim().parse::<u16>().ok());
            let abort_grpc = req.header(&h.abort_grpc_header)?.and_then(|v| v.trim().parse::<u32>().ok());
            let pct = header_percent(http, &h.abort_percentage_header)?;
            let picked = match (abort_grpc.and_then(GrpcStatus::from_u32), abort_http) {
                (Some(g), _) if g != GrpcStatus::Ok => Some(AbortWith::Grpc(g, "fault filter abort".into())),
                (_, Some(s)) if (200..600).contains(&s) => {
                    Some(AbortWith::Http(s, "fault filter abort\n".into()))
                }
                _ => None,
            };
            if picked.is_some() && random::chance(pct) {
                decision.abort = picked;
            }
        }
        Ok(decision)
    }
}

fn header_percent(http: &Http, name: &str) -> Result<f64, Error> {
    Ok(http
        .request()
        .header(name)?
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|p| p.is_finite())
        .map_or(100.0, |p| p.clamp(0.0, 100.0)))
}

impl HttpContext for Fault {
    fn on_request_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        let Some(config) = self.config.clone() else { return Ok(Action::Continue) };
        if let Some(max) = config.max_active_faults
            && self.pending.borrow().len() >= max as usize
        {
            return Ok(Action::Continue);
        }
        let decision = self.decide(&config, http)?;
        // An abort wins over a delay: a local reply cannot be sent from the timer.
        if let Some(abort) = decision.abort {
            if let Some(m) = self.metrics {
                m.aborts.inc()?;
            }
            match abort {
                AbortWith::Http(status, body) => {
                    sluice_sdk::debug!("fault: aborting with {status}");
                    http.respond(status, &[("x-fault-injected", "abort")], body)?;
                }
                AbortWith::Grpc(status, message) => {
                    sluice_sdk::debug!("fault: aborting with grpc {status:?}");
                    http.respond_grpc(status, &message, &[("x-fault-injected", "abort")])?;
                }
            }
            return Ok(Action::Pause);
        }
        if let Some(delay) = decision.delay.filter(|d| !d.is_zero()) {
            let due = sluice_sdk::host::now()? + delay;
            self.pending.borrow_mut().push((http.id(), due));
            self.delayed = true;
            if let Some(m) = self.metrics {
                m.delays.inc()?;
                m.active.increment(1)?;
            }
            sluice_sdk::debug!("fault: delaying request {} by {delay:?}", http.id());
            return Ok(Action::Pause);
        }
        Ok(Action::Continue)
    }

    fn on_response_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        if self.delayed {
            http.response().set_header("x-fault-injected", "delay")?;
        }
        Ok(Action::Continue)
    }

    fn on_log(&mut self, http: &mut Http) -> Result<(), Error> {
        // A request that ended while delayed (client gone) leaves the timer list.
        let id = http.id();
        self.pending.borrow_mut().retain(|(ctx, _)| *ctx != id);
        Ok(())
    }
}

sluice_sdk::filter!(FaultRoot);
