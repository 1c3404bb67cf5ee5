//! The key store of one VM: inline key sets, and remote JWKS fetched by callout,
//! shared with the other VMs through shared data (`<fetched-at-ms>\n<jwks>` under
//! [`RemoteJwks::shared_key`]) and refreshed from the root's timer.

use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_sdk::metrics::Counter;
use sluice_sdk::{CalloutResponse, Error, HttpCall, Root, Token, shared};

use crate::config::{Config, RemoteJwks};
use crate::jwks::{self, KeySet};
use crate::jwt::JwtError;

/// The filter's counters.
pub struct Metrics {
    pub allowed: Counter,
    pub missing_allowed: Counter,
    denied: Vec<Counter>,
    fetch_ok: Counter,
    fetch_failed: Counter,
}

impl Metrics {
    pub fn define() -> Result<Metrics, Error> {
        let mut denied = Vec::new();
        for e in JwtError::ALL {
            denied.push(Counter::new(&format!("jwt_auth_denied_{}", e.code()))?);
        }
        Ok(Metrics {
            allowed: Counter::new("jwt_auth_allowed")?,
            missing_allowed: Counter::new("jwt_auth_missing_allowed")?,
            denied,
            fetch_ok: Counter::new("jwt_auth_jwks_fetch_ok")?,
            fetch_failed: Counter::new("jwt_auth_jwks_fetch_failed")?,
        })
    }

    pub fn denied(&self, error: JwtError) -> Result<(), Error> {
        if let Some(i) = JwtError::ALL.iter().position(|e| *e == error)
            && let Some(c) = self.denied.get(i)
        {
            c.inc()?;
        }
        Ok(())
    }
}

/// The GET that fetches a remote JWKS.
pub fn fetch_call(remote: &RemoteJwks) -> HttpCall {
    let call = HttpCall::get(remote.cluster.as_str(), &remote.path)
        .header("accept", "application/json")
        .timeout(remote.timeout.get());
    match &remote.authority {
        Some(a) => call.authority(a),
        None => call,
    }
}

#[derive(Default)]
struct Slot {
    keys: Option<Rc<KeySet>>,
    fetched_at: Option<SystemTime>,
    last_attempt: Option<SystemTime>,
    fetching: Option<(Token, SystemTime)>,
    refresh_wanted: bool,
}

/// Keys per provider (same order as the config's providers).
#[derive(Default)]
pub struct KeyStore {
    slots: Vec<Slot>,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn after(t: Option<SystemTime>, wait: Duration, now: SystemTime) -> bool {
    t.is_none_or(|t| now >= t + wait)
}

impl KeyStore {
    /// A store holding the inline key sets.
    pub fn new(inline: Vec<Option<KeySet>>) -> KeyStore {
        KeyStore {
            slots: inline.into_iter().map(|k| Slot { keys: k.map(Rc::new), ..Slot::default() }).collect(),
        }
    }

    /// Provider `index`'s keys, if loaded.
    pub fn keys(&self, index: usize) -> Option<Rc<KeySet>> {
        self.slots.get(index).and_then(|s| s.keys.clone())
    }

    /// Asks for an early refetch (a token named an unknown `kid`).
    pub fn want_refresh(&mut self, index: usize) {
        if let Some(s) = self.slots.get_mut(index) {
            s.refresh_wanted = true;
        }
    }

    /// Adopts newer keys another VM stored, and starts the fetches that are due.
    pub fn refresh(&mut self, root: &mut Root, config: &Config, metrics: &Metrics, now: SystemTime) {
        for (i, p) in config.providers.iter().enumerate() {
            let Some(remote) = &p.remote_jwks else { continue };
            self.adopt_shared(i, remote);
            let Some(slot) = self.slots.get_mut(i) else { continue };
            if let Some((_, started)) = slot.fetching {
                if now < started + remote.timeout.get() * 2 {
                    continue;
                }
                slot.fetching = None;
            }
            let stale = slot.keys.is_none()
                || slot.refresh_wanted
                || after(slot.fetched_at, remote.refresh.get(), now);
            if !stale || !after(slot.last_attempt, remote.retry.get(), now) {
                continue;
            }
            slot.last_attempt = Some(now);
            match root.http_call(&fetch_call(remote)) {
                Ok(token) => slot.fetching = Some((token, now)),
                Err(e) => {
                    let _ = metrics.fetch_failed.inc();
                    sluice_sdk::warn!("jwt-auth: cannot fetch the JWKS of provider {}: {e}", p.name);
                }
            }
        }
    }

    fn adopt_shared(&mut self, index: usize, remote: &RemoteJwks) {
        let Ok(Some((bytes, _))) = shared::get(&remote.shared_key()) else { return };
        let Some(pos) = bytes.iter().position(|b| *b == b'\n') else { return };
        let Some(at) = std::str::from_utf8(&bytes[..pos]).ok().and_then(|s| s.parse::<u64>().ok()) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(index) else { return };
        if slot.fetched_at.is_some_and(|t| millis(t) >= at) {
            return;
        }
        if let Ok(set) = jwks::parse(&bytes[pos + 1..]) {
            slot.keys = Some(Rc::new(set));
            slot.fetched_at = Some(UNIX_EPOCH + Duration::from_millis(at));
            slot.refresh_wanted = false;
        }
    }

    /// A root callout answered: store the keys it brought.
    pub fn on_fetched(
        &mut self,
        config: &Config,
        metrics: &Metrics,
        token: Token,
        response: &CalloutResponse,
        now: SystemTime,
    ) {
        let Some(index) = self.slots.iter().position(|s| s.fetching.is_some_and(|(t, _)| t == token)) else {
            return;
        };
        if let Some(slot) = self.slots.get_mut(index) {
            slot.fetching = None;
        }
        self.store_response(config, metrics, index, response, now);
    }

    /// Parses a JWKS response for provider `index`, keeping the old keys on failure.
    pub fn store_response(
        &mut self,
        config: &Config,
        metrics: &Metrics,
        index: usize,
        response: &CalloutResponse,
        now: SystemTime,
    ) {
        let Some(provider) = config.providers.get(index) else { return };
        let Some(slot) = self.slots.get_mut(index) else { return };
        slot.last_attempt = Some(now);
        let parsed = match response.status() {
            Some(200) => jwks::parse(&response.body),
            Some(status) => Err(format!("status {status}")),
            None => Err(response.failure.as_ref().map_or("no response".into(), |f| f.message.clone())),
        };
        match parsed {
            Ok(set) => {
                sluice_sdk::info!(
                    "jwt-auth: provider {} has {} keys ({} skipped)",
                    provider.name,
                    set.keys.len(),
                    set.skipped
                );
                slot.keys = Some(Rc::new(set));
                slot.fetched_at = Some(now);
                slot.refresh_wanted = false;
                let _ = metrics.fetch_ok.inc();
                if let Some(remote) = &provider.remote_jwks {
                    let mut value = format!("{}\n", millis(now)).into_bytes();
                    value.extend_from_slice(&response.body);
                    if let Err(e) = shared::set(&remote.shared_key(), &value, None) {
                        sluice_sdk::warn!("jwt-auth: cannot share the JWKS of {}: {e}", provider.name);
                    }
                }
            }
            Err(reason) => {
                let _ = metrics.fetch_failed.inc();
                sluice_sdk::warn!("jwt-auth: JWKS fetch for provider {} failed: {reason}", provider.name);
            }
        }
    }
}
