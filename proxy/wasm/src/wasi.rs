//! The WASI preview1 subset, implemented directly (as Envoy's C++ host does)
//! rather than with `wasmtime-wasi`: no preopens, no sockets, no filesystem;
//! stdout/stderr go to `tracing` (per line, with the plugin name); clocks;
//! `random_get` from the OS; the environment from `FilterSpec::env`; no args.
//! The stubs answer what Envoy's C++ host (cpp-host) answers, so the runtimes
//! that probe them at start-up (Go's `wasip1`: `fd_fdstat_get`,
//! `fd_fdstat_set_flags`, `poll_oneoff`) start as they do on Envoy. Modules
//! importing other WASI functions (the filesystem's `path_*`, sockets) are
//! rejected at load.
//!
//! `wasmtime-wasi`'s preview1 adapter is built on its async preview2 core and
//! blocks on a tokio runtime from sync calls, which does not work inside the
//! workers' current-thread runtimes; the handful of functions filters use are
//! simpler to provide here.

use std::fs::File;
use std::io::Read;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker};

use crate::memory::{memory, range, write_u32, write_u64};
use crate::state::{GUEST_TARGET, VmState};
use crate::vm::GuestExit;

/// WASI functions a module may import.
pub(crate) const ALLOWED: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_write",
    "fd_read",
    "fd_close",
    "fd_seek",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "proc_exit",
    "random_get",
    "sched_yield",
    "poll_oneoff",
];

const SUCCESS: i32 = 0;
const BADF: i32 = 8;
const FAULT: i32 = 21;
const INVAL: i32 = 28;
const NOSYS: i32 = 52;
const NOTSUP: i32 = 58;
/// `__WASI_RIGHTS_FD_WRITE`.
const RIGHTS_FD_WRITE: u64 = 64;

/// Largest `random_get` request (as Envoy's host).
const MAX_RANDOM: usize = 64 * 1024;
/// Longest line kept in a stdout/stderr buffer.
const MAX_LINE: usize = 4096;
/// Bytes one `fd_write` takes at most; the rest is a short write, which
/// callers loop on. Host code runs past the epoch deadline, and iovecs may
/// all point at the same memory: uncapped, one call could make the host read
/// terabytes.
const MAX_WRITE: u32 = 1 << 20;

type C<'a> = Caller<'a, VmState>;

fn errno(r: Result<(), i32>) -> i32 {
    match r {
        Ok(()) => SUCCESS,
        Err(e) => e,
    }
}

fn fault<T>(_: T) -> i32 {
    FAULT
}

/// Registers the subset under `module`.
pub(crate) fn add(l: &mut Linker<VmState>, module: &str) -> wasmtime::Result<()> {
    l.func_wrap(module, "args_get", |_: C<'_>, _: i32, _: i32| SUCCESS)?;
    l.func_wrap(module, "args_sizes_get", |mut c: C<'_>, count: i32, size: i32| {
        errno(two_u32(&mut c, count, 0, size, 0))
    })?;
    l.func_wrap(module, "environ_sizes_get", |mut c: C<'_>, count: i32, size: i32| {
        let env = &c.data().plugin.env;
        let n = env.len() as u32;
        let bytes: usize = env.iter().map(|e| e.len() + 1).sum();
        errno(two_u32(&mut c, count, n, size, bytes as u32))
    })?;
    l.func_wrap(module, "environ_get", |mut c: C<'_>, ptrs: i32, buf: i32| {
        errno(environ_get(&mut c, ptrs, buf))
    })?;
    l.func_wrap(module, "clock_res_get", |mut c: C<'_>, id: i32, ret: i32| {
        if !(0..=1).contains(&id) {
            return NOTSUP;
        }
        errno(store64(&mut c, ret, 1))
    })?;
    l.func_wrap(module, "clock_time_get", |mut c: C<'_>, id: i32, _precision: i64, ret: i32| {
        let now = match id {
            0 => SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos(),
            1 => start().elapsed().as_nanos() + 1,
            _ => return NOTSUP,
        };
        errno(store64(&mut c, ret, u64::try_from(now).unwrap_or(u64::MAX)))
    })?;
    l.func_wrap(module, "fd_write", |mut c: C<'_>, fd: i32, iovs: i32, n: i32, ret: i32| {
        errno(fd_write(&mut c, fd, iovs, n, ret))
    })?;
    l.func_wrap(module, "fd_read", |_: C<'_>, _: i32, _: i32, _: i32, _: i32| NOSYS)?;
    l.func_wrap(module, "fd_close", |_: C<'_>, _: i32| BADF)?;
    l.func_wrap(module, "fd_seek", |_: C<'_>, _: i32, _: i64, _: i32, _: i32| BADF)?;
    l.func_wrap(module, "fd_fdstat_get", |mut c: C<'_>, fd: i32, ret: i32| {
        errno(fd_fdstat_get(&mut c, fd, ret))
    })?;
    // No descriptor's flags can change (there are no descriptors but the log).
    l.func_wrap(module, "fd_fdstat_set_flags", |_: C<'_>, _: i32, _: i32| NOSYS)?;
    l.func_wrap(module, "fd_prestat_get", |_: C<'_>, _: i32, _: i32| BADF)?;
    l.func_wrap(module, "fd_prestat_dir_name", |_: C<'_>, _: i32, _: i32, _: i32| BADF)?;
    l.func_wrap(module, "proc_exit", |_: C<'_>, code: i32| -> wasmtime::Result<()> {
        Err(wasmtime::Error::new(GuestExit(code)))
    })?;
    l.func_wrap(module, "random_get", |mut c: C<'_>, buf: i32, len: i32| {
        errno(random_get(&mut c, buf, len))
    })?;
    l.func_wrap(module, "sched_yield", |_: C<'_>| SUCCESS)?;
    // No event ever comes (cpp-host's answer): nothing to wait for, and a worker
    // never sleeps in a guest. Go's runtime calls it to sleep and stops on an error.
    l.func_wrap(module, "poll_oneoff", |mut c: C<'_>, _: i32, _: i32, _: i32, nevents: i32| {
        errno(store32(&mut c, nevents, 0))
    })?;
    Ok(())
}

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn two_u32(c: &mut C<'_>, p1: i32, v1: u32, p2: i32, v2: u32) -> Result<(), i32> {
    let mem = memory(c).map_err(fault)?;
    let data = mem.data_mut(&mut *c);
    range(data.len(), p1, 4).map_err(fault)?;
    range(data.len(), p2, 4).map_err(fault)?;
    write_u32(data, p1, v1).map_err(fault)?;
    write_u32(data, p2, v2).map_err(fault)
}

fn store32(c: &mut C<'_>, p: i32, v: u32) -> Result<(), i32> {
    let mem = memory(c).map_err(fault)?;
    write_u32(mem.data_mut(&mut *c), p, v).map_err(fault)
}

/// stdout and stderr (the log) are write-only character streams; there is no
/// other descriptor (cpp-host's answer).
fn fd_fdstat_get(c: &mut C<'_>, fd: i32, ret: i32) -> Result<(), i32> {
    if fd != 1 && fd != 2 {
        return Err(BADF);
    }
    let mem = memory(c).map_err(fault)?;
    let data = mem.data_mut(&mut *c);
    // fdstat: filetype u8, flags u16 (at 2), rights_base u64 (at 8),
    // rights_inheriting u64 (at 16); 24 bytes.
    let r = range(data.len(), ret, 24).map_err(fault)?;
    data[r].fill(0);
    write_u64(data, (ret as u32).wrapping_add(8) as i32, RIGHTS_FD_WRITE).map_err(fault)
}

fn store64(c: &mut C<'_>, p: i32, v: u64) -> Result<(), i32> {
    let mem = memory(c).map_err(fault)?;
    write_u64(mem.data_mut(&mut *c), p, v).map_err(fault)
}

fn environ_get(c: &mut C<'_>, ptrs: i32, buf: i32) -> Result<(), i32> {
    let mem = memory(c).map_err(fault)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    let env = &st.plugin.env;
    let total: usize = env.iter().map(|e| e.len() + 1).sum();
    range(data.len(), ptrs, (env.len() * 4) as i32).map_err(fault)?;
    let area = range(data.len(), buf, total as i32).map_err(fault)?;
    let mut at = area.start;
    for (i, e) in env.iter().enumerate() {
        // In u32 arithmetic: a pointer past 2 GiB is negative as an i32.
        write_u32(data, (ptrs as u32).wrapping_add(4 * i as u32) as i32, at as u32).map_err(fault)?;
        data[at..at + e.len()].copy_from_slice(e.as_bytes());
        data[at + e.len()] = 0;
        at += e.len() + 1;
    }
    Ok(())
}

fn random_get(c: &mut C<'_>, buf: i32, len: i32) -> Result<(), i32> {
    static URANDOM: OnceLock<Option<File>> = OnceLock::new();
    let len_usize = len as u32 as usize;
    if len_usize > MAX_RANDOM {
        return Err(INVAL);
    }
    let mem = memory(c).map_err(fault)?;
    let data = mem.data_mut(&mut *c);
    let r = range(data.len(), buf, len).map_err(fault)?;
    let file = URANDOM.get_or_init(|| File::open("/dev/urandom").ok()).as_ref().ok_or(NOTSUP)?;
    let mut f = file;
    f.read_exact(&mut data[r]).map_err(|_| NOTSUP)
}

fn fd_write(c: &mut C<'_>, fd: i32, iovs: i32, n: i32, ret: i32) -> Result<(), i32> {
    if fd != 1 && fd != 2 {
        return Err(BADF);
    }
    let mem = memory(c).map_err(fault)?;
    let (data, st) = mem.data_and_store_mut(&mut *c);
    range(data.len(), ret, 4).map_err(fault)?;
    // The iovec table's size in 64-bit arithmetic: `n` up to 2^32 - 1 entries of
    // 8 bytes must not wrap to a small length (the fuzzer found that one).
    let table_len = u32::try_from(u64::from(n as u32) * 8).map_err(fault)?;
    let table = range(data.len(), iovs, table_len as i32).map_err(fault)?;
    let mut written = 0u32;
    for at in table.step_by(8) {
        let word = |at: usize| data.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
        let (Some(ptr), Some(len)) = (word(at), word(at + 4)) else { return Err(FAULT) };
        let r = range(data.len(), ptr as i32, len as i32).map_err(fault)?;
        let take = len.min(MAX_WRITE - written);
        for &b in &data[r.start..r.start + take as usize] {
            line_byte(st, fd, b);
        }
        written += take;
        if written == MAX_WRITE {
            break;
        }
    }
    write_u32(data, ret, written).map_err(fault)
}

fn line_byte(st: &mut VmState, fd: i32, b: u8) {
    let buf = if fd == 1 { &mut st.log.stdout } else { &mut st.log.stderr };
    if b == b'\n' {
        emit(st, fd);
    } else if buf.len() < MAX_LINE {
        buf.push(b);
    }
}

fn emit(st: &mut VmState, fd: i32) {
    let bytes = std::mem::take(if fd == 1 { &mut st.log.stdout } else { &mut st.log.stderr });
    if bytes.is_empty() {
        return;
    }
    let line = String::from_utf8_lossy(&bytes);
    let plugin = &*st.plugin.name;
    // As `proxy_log`'s lines: only those emitted count against the callback's quota.
    if fd == 1 {
        if tracing::enabled!(target: GUEST_TARGET, tracing::Level::INFO) && st.log.admit() {
            tracing::info!(target: GUEST_TARGET, plugin, stream = "stdout", "{line}");
        }
        st.log.capture("stdout", &line);
    } else {
        if tracing::enabled!(target: GUEST_TARGET, tracing::Level::ERROR) && st.log.admit() {
            tracing::error!(target: GUEST_TARGET, plugin, stream = "stderr", "{line}");
        }
        st.log.capture("stderr", &line);
        // Rust's default panic hook writes the panic to stderr: keep it for the
        // trap message unless the guest logged a CRITICAL line.
        if !line.starts_with("note: ") {
            let joined = match st.log.last_fatal.take() {
                Some(prev) if st.log.fatal_from_stderr => format!("{prev} {line}"),
                Some(prev) => {
                    st.log.last_fatal = Some(prev);
                    return;
                }
                None => line.into_owned(),
            };
            st.log.fatal(&joined);
            st.log.fatal_from_stderr = true;
        }
    }
}

/// Emits partial stdout/stderr lines at the end of a callback.
pub(crate) fn flush_lines(st: &mut VmState) {
    if !st.log.stdout.is_empty() {
        emit(st, 1);
    }
    if !st.log.stderr.is_empty() {
        emit(st, 2);
    }
}
