//! Logging, time, timers, contexts, status, properties, metrics, shared data
//! and shared queues.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_abi::{LogLevel, MetricType, Status, foreign};
use tracing::Level;
use tracing::level_filters::LevelFilter;
use wasmtime::Caller;

use crate::memory::{
    HostResult, give_bytes, memory, range, read_vec, slice, store_u32, store_u64, write_u32,
};
use crate::metrics::GuestMetric;
use crate::state::{Deferred, GUEST_TARGET, VmState, noop_names};

pub(super) fn log(c: &mut Caller<'_, VmState>, level: i32, p: i32, n: i32) -> HostResult {
    let level = LogLevel::from_u32(level as u32).ok_or(Status::BadArgument)?;
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    let bytes = slice(data, p, n)?;
    let plugin = &*st.plugin.name;
    let keep = st.log.capture.is_some() || level == LogLevel::Critical;
    // Only lines the subscriber would emit count against the callback's quota.
    let emit = enabled(level) && st.log.admit();
    if !keep && !emit {
        return Ok(());
    }
    let msg = clip(bytes);
    if keep {
        st.log.capture(level_name(level), &msg);
        if level == LogLevel::Critical {
            st.log.fatal(&msg);
        }
    }
    if !emit {
        return Ok(());
    }
    match level {
        LogLevel::Trace => tracing::trace!(target: GUEST_TARGET, plugin, "{msg}"),
        LogLevel::Debug => tracing::debug!(target: GUEST_TARGET, plugin, "{msg}"),
        LogLevel::Info => tracing::info!(target: GUEST_TARGET, plugin, "{msg}"),
        LogLevel::Warn => tracing::warn!(target: GUEST_TARGET, plugin, "{msg}"),
        LogLevel::Error | LogLevel::Critical => {
            tracing::error!(target: GUEST_TARGET, plugin, level = level_name(level), "{msg}")
        }
    }
    Ok(())
}

/// Longest guest log message emitted whole; a longer one is cut, with its size.
const MAX_MESSAGE: usize = 16 * 1024;

/// A guest's log message as text, cut at [`MAX_MESSAGE`] bytes.
fn clip(bytes: &[u8]) -> Cow<'_, str> {
    let Some(head) = bytes.get(..MAX_MESSAGE).filter(|_| bytes.len() > MAX_MESSAGE) else {
        return String::from_utf8_lossy(bytes);
    };
    Cow::Owned(format!("{}… [{} bytes, cut at {MAX_MESSAGE}]", String::from_utf8_lossy(head), bytes.len()))
}

/// Whether the subscriber emits guest lines of this level.
fn enabled(level: LogLevel) -> bool {
    match level {
        LogLevel::Trace => tracing::enabled!(target: GUEST_TARGET, Level::TRACE),
        LogLevel::Debug => tracing::enabled!(target: GUEST_TARGET, Level::DEBUG),
        LogLevel::Info => tracing::enabled!(target: GUEST_TARGET, Level::INFO),
        LogLevel::Warn => tracing::enabled!(target: GUEST_TARGET, Level::WARN),
        LogLevel::Error | LogLevel::Critical => tracing::enabled!(target: GUEST_TARGET, Level::ERROR),
    }
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Trace => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
        LogLevel::Critical => "critical",
    }
}

pub(super) fn get_log_level(c: &mut Caller<'_, VmState>, ret: i32) -> HostResult {
    // The most verbose level any subscriber may want; "off" maps to critical
    // (the SDK panics on values past 5).
    let level = match LevelFilter::current() {
        LevelFilter::TRACE => LogLevel::Trace,
        LevelFilter::DEBUG => LogLevel::Debug,
        LevelFilter::INFO => LogLevel::Info,
        LevelFilter::WARN => LogLevel::Warn,
        LevelFilter::ERROR => LogLevel::Error,
        _ => LogLevel::Critical,
    };
    store_u32(c, ret, level as u32)
}

pub(super) fn current_time(c: &mut Caller<'_, VmState>, ret: i32) -> HostResult {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    store_u64(c, ret, u64::try_from(now.as_nanos()).unwrap_or(u64::MAX))
}

pub(super) fn set_tick_period(c: &mut Caller<'_, VmState>, ms: i32) -> HostResult {
    let st = c.data_mut();
    let ms = u64::from(ms as u32);
    st.tick_period = if ms == 0 { None } else { Some(Duration::from_millis(ms)) };
    st.deferred.push(Deferred::Tick);
    Ok(())
}

pub(super) fn set_effective_context(c: &mut Caller<'_, VmState>, id: i32) -> HostResult {
    let st = c.data_mut();
    let id = id as u32;
    if id != st.root_id && !st.contexts.contains_key(&id) {
        return Err(Status::BadArgument.into());
    }
    st.frame.effective = id;
    Ok(())
}

pub(super) fn get_status(
    c: &mut Caller<'_, VmState>,
    ret_code: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> HostResult {
    let (code, message) = c.data().callout.as_ref().map_or((0, String::new()), |d| d.status.clone());
    {
        let mem = memory(c)?;
        let data = mem.data(&*c);
        range(data.len(), ret_code, 4)?;
    }
    give_bytes(c, message.as_bytes(), ret_ptr, ret_size)?;
    store_u32(c, ret_code, code)
}

// === properties ===

pub(super) fn get_property(
    c: &mut Caller<'_, VmState>,
    pp: i32,
    pn: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> HostResult {
    let path = read_vec(c, pp, pn)?;
    let mut out = Vec::new();
    if !crate::properties::get(c.data(), &path, &mut out) {
        return Err(Status::NotFound.into());
    }
    give_bytes(c, &out, ret_ptr, ret_size)
}

/// `proxy_call_foreign_function`: Sluice's one foreign function,
/// [`foreign::NOOP_HTTP_CALLBACKS`] (no result, so the result pointers are left
/// alone); any other name is `NotFound`, as in Envoy.
pub(super) fn call_foreign_function(
    c: &mut Caller<'_, VmState>,
    np: i32,
    nn: i32,
    ap: i32,
    an: i32,
) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    if slice(data, np, nn)? != foreign::NOOP_HTTP_CALLBACKS.as_bytes() {
        return Err(Status::NotFound.into());
    }
    let bits = <[u8; 4]>::try_from(slice(data, ap, an)?).map_err(|_| Status::BadArgument)?;
    if let Some(set) = st.declare_noop(u32::from_le_bytes(bits)) {
        st.plugin.record_noop(set);
        tracing::debug!(plugin = %st.plugin.name, callbacks = ?noop_names(set), "guest declared no-op HTTP callbacks");
    }
    Ok(())
}

pub(super) fn set_property(c: &mut Caller<'_, VmState>, pp: i32, pn: i32, vp: i32, vn: i32) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    let path = slice(data, pp, pn)?;
    let path = path.strip_suffix(&[0]).unwrap_or(path);
    let value = slice(data, vp, vn)?;
    // 256 entries per context and per stream (`FilterState`) of at most
    // 1 MiB each, path and value.
    if value.len() > crate::shared::MAX_VALUE_BYTES || path.len() > crate::shared::MAX_VALUE_BYTES {
        return Err(Status::BadArgument.into());
    }
    // With the request's stream in scope (a phase, `on_log`, the answer to
    // a callout the context made), the value goes on the stream, where every
    // filter of the request reads it, as Envoy's filter state; the context
    // keeps its own copy too.
    let stream = crate::properties::stream_in_scope(st);
    let props = match st.contexts.get_mut(&st.frame.effective) {
        Some(ctx) => &mut ctx.properties,
        None => &mut st.root_properties,
    };
    let shared_ok =
        !stream || crate::properties::INFO.with(|info| info.filter_state.borrow_mut().set(path, value));
    if !shared_ok || !props.set(path, value) {
        return Err(Status::BadArgument.into());
    }
    Ok(())
}

// === shared data and queues ===

pub(super) fn get_shared_data(
    c: &mut Caller<'_, VmState>,
    kp: i32,
    kn: i32,
    ret_ptr: i32,
    ret_size: i32,
    ret_cas: i32,
) -> HostResult {
    let mem = memory(c)?;
    let found = {
        let data = mem.data(&*c);
        range(data.len(), ret_cas, 4)?;
        let key = slice(data, kp, kn)?;
        let st = c.data();
        st.plugin.host.shared.get(&st.plugin.vm_id, key)
    };
    let (value, cas) = found.ok_or(Status::NotFound)?;
    give_bytes(c, &value, ret_ptr, ret_size)?;
    store_u32(c, ret_cas, cas)
}

pub(super) fn set_shared_data(
    c: &mut Caller<'_, VmState>,
    kp: i32,
    kn: i32,
    vp: i32,
    vn: i32,
    cas: i32,
) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    let key = slice(data, kp, kn)?;
    let value = slice(data, vp, vn)?;
    st.plugin.host.shared.set(&st.plugin.vm_id, key, value, cas as u32)?;
    Ok(())
}

pub(super) fn register_queue(c: &mut Caller<'_, VmState>, p: i32, n: i32, ret: i32) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    range(data.len(), ret, 4)?;
    let name = slice(data, p, n)?;
    if st.mailbox.is_none() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        st.mailbox = Some(tx);
        st.deferred.push(Deferred::Mailbox(rx));
    }
    let Some(tx) = st.mailbox.as_ref() else { return Err(Status::InternalFailure.into()) };
    let id = st.plugin.host.shared.register_queue(&st.plugin.vm_id, name, tx)?;
    write_u32(data, ret, id)?;
    Ok(())
}

pub(super) fn resolve_queue(
    c: &mut Caller<'_, VmState>,
    vp: i32,
    vn: i32,
    p: i32,
    n: i32,
    ret: i32,
) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    range(data.len(), ret, 4)?;
    let vm_id = slice(data, vp, vn)?;
    let name = slice(data, p, n)?;
    let scope = if vm_id.is_empty() {
        &*st.plugin.vm_id
    } else {
        std::str::from_utf8(vm_id).map_err(|_| Status::NotFound)?
    };
    let id = st.plugin.host.shared.resolve_queue(scope, name).ok_or(Status::NotFound)?;
    write_u32(data, ret, id)?;
    Ok(())
}

pub(super) fn enqueue(c: &mut Caller<'_, VmState>, id: i32, p: i32, n: i32) -> HostResult {
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    let item = slice(data, p, n)?;
    st.plugin.host.shared.enqueue(id as u32, item)?;
    Ok(())
}

pub(super) fn dequeue(c: &mut Caller<'_, VmState>, id: i32, ret_ptr: i32, ret_size: i32) -> HostResult {
    let item = c.data().plugin.host.shared.dequeue(id as u32)?;
    give_bytes(c, &item, ret_ptr, ret_size)
}

// === metrics ===

pub(super) fn define_metric(c: &mut Caller<'_, VmState>, t: i32, p: i32, n: i32, ret: i32) -> HostResult {
    let kind = MetricType::from_u32(t as u32).ok_or(Status::BadArgument)?;
    let mem = memory(c)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    range(data.len(), ret, 4)?;
    let name = std::str::from_utf8(slice(data, p, n)?).map_err(|_| Status::BadArgument)?;
    let plugin = st.plugin.clone();
    let mut table = plugin.guest_metrics.lock();
    let index = match table.iter().position(|(k, nm, _)| *k == kind && nm == name) {
        Some(i) => i,
        None => {
            if table.len() >= 1000 {
                return Err(Status::BadArgument.into());
            }
            let metric = plugin.host.guest_metrics.define(&plugin.name, kind, name);
            table.push((kind, name.to_string(), metric));
            table.len() - 1
        }
    };
    let metric = table[index].2.clone();
    drop(table);
    if st.metrics.len() <= index {
        st.metrics.resize(index + 1, None);
    }
    st.metrics[index] = Some(metric);
    write_u32(data, ret, index as u32 + 1)?;
    Ok(())
}

/// The metric with this id: from the VM's cache, or the plugin's table (another
/// VM of the plugin defined it).
/// (Borrowed, not cloned: a clone counts references to the metric.)
fn metric(st: &mut VmState, id: i32) -> Result<&GuestMetric, Status> {
    let index = (id as u32).checked_sub(1).ok_or(Status::NotFound)? as usize;
    if !matches!(st.metrics.get(index), Some(Some(_))) {
        let m =
            st.plugin.guest_metrics.lock().get(index).map(|(_, _, m)| m.clone()).ok_or(Status::NotFound)?;
        if st.metrics.len() <= index {
            st.metrics.resize(index + 1, None);
        }
        st.metrics[index] = Some(m);
    }
    st.metrics.get(index).and_then(Option::as_ref).ok_or(Status::NotFound)
}

pub(super) fn increment_metric(c: &mut Caller<'_, VmState>, id: i32, delta: i64) -> HostResult {
    match metric(c.data_mut(), id)? {
        GuestMetric::Counter(m) if delta > 0 => m.inc_by(delta as u64),
        GuestMetric::Counter(_) => return Err(Status::BadArgument.into()),
        GuestMetric::Gauge(m) => m.add(delta),
        GuestMetric::Histogram(_) => return Err(Status::BadArgument.into()),
    }
    Ok(())
}

pub(super) fn record_metric(c: &mut Caller<'_, VmState>, id: i32, value: i64) -> HostResult {
    match metric(c.data_mut(), id)? {
        // Envoy: recording on a counter adds to it.
        GuestMetric::Counter(m) => {
            if value > 0 {
                m.inc_by(value as u64);
            }
        }
        GuestMetric::Gauge(m) => m.set(value),
        GuestMetric::Histogram(m) => m.observe(value as f64),
    }
    Ok(())
}

pub(super) fn get_metric(c: &mut Caller<'_, VmState>, id: i32, ret: i32) -> HostResult {
    let value = match metric(c.data_mut(), id)? {
        GuestMetric::Counter(m) => m.get(),
        GuestMetric::Gauge(m) => m.get() as u64,
        GuestMetric::Histogram(_) => return Err(Status::BadArgument.into()),
    };
    store_u64(c, ret, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_log_message_is_cut_with_its_size() {
        assert_eq!(clip(b"short"), "short");
        let long = vec![b'a'; MAX_MESSAGE + 10];
        let cut = clip(&long);
        assert!(cut.starts_with(&"a".repeat(MAX_MESSAGE)), "kept the head");
        assert!(
            cut.ends_with(&format!("… [{} bytes, cut at {MAX_MESSAGE}]", MAX_MESSAGE + 10)),
            "{}",
            &cut[MAX_MESSAGE..]
        );
        assert_eq!(
            cut.len(),
            MAX_MESSAGE + format!("… [{} bytes, cut at {MAX_MESSAGE}]", MAX_MESSAGE + 10).len()
        );
    }
}
