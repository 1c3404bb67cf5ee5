//! Quotas: what a guest can make the host hold (header maps, log lines) or
//! do in one host call (`fd_write`), and the VM pool.

use std::sync::Arc;

use sluice_config::FailPolicy;
use sluice_filter::{FilterErrorKind, FilterFactory, HeadersAction};
use sluice_wasm::{HostOptions, WasmHost};

use crate::common::{Exchange, TestCallouts, captured_logs, host, metric, run, spec};
use crate::sandbox::{checks_pass, module};

#[test]
fn header_writes_past_the_quota_are_refused_not_a_panic() {
    let imports = r#"
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))"#;
    // 30,000 adds of `x-f: a`: the `http` crate's maps panic past ~24,000 fields.
    let many = module(
        imports,
        r#"(local $i i32)
    (loop $l
      (drop (call $add (i32.const 0) (i32.const 16) (i32.const 3) (i32.const 19) (i32.const 1)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 30000))))
    (i32.const 0)"#,
        r#"(data (i32.const 16) "x-fa")"#,
    );
    // Ten replaces of `x-big` with 64 KiB, counting the accepted ones into `x-ok`.
    let big = module(
        imports,
        r#"(local $i i32)
    (memory.fill (i32.const 1024) (i32.const 97) (i32.const 65536))
    (loop $l
      (if (i32.eqz (call $replace (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 1024) (i32.const 65536)))
        (then (i32.store8 (i32.const 32) (i32.add (i32.load8_u (i32.const 32)) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 10))))
    (drop (call $replace (i32.const 0) (i32.const 24) (i32.const 4) (i32.const 32) (i32.const 1)))
    (i32.const 0)"#,
        r#"(data (i32.const 16) "x-big") (data (i32.const 24) "x-ok") (data (i32.const 32) "0")"#,
    );
    let (host, _) = host();
    let many = host.load_bytes(&spec("many"), &many, &[]).expect("load many");
    let mut s = spec("big");
    s.limits.memory_bytes = 256 * 1024;
    let big = host.load_bytes(&s, &big, &[]).expect("load big");
    run(async {
        // The quota is per request: the second request gets a fresh one.
        for _ in 0..2 {
            let mut ex = Exchange::new(&many, "http://a.test/");
            assert!(matches!(ex.request_headers(true).await, Ok(HeadersAction::Continue)));
            assert_eq!(ex.req.headers.get_all("x-f").iter().count(), 8192);
        }
        // 256 KiB written per request: three 64 KiB values, then a small one.
        let mut ex = Exchange::new(&big, "http://a.test/");
        assert!(matches!(ex.request_headers(true).await, Ok(HeadersAction::Continue)));
        assert_eq!(ex.req.headers.get("x-ok").map(|v| v.as_bytes()), Some(&b"3"[..]));
        assert_eq!(ex.req.headers.get("x-big").map(|v| v.len()), Some(65536));
    });
    assert_eq!(many.status()["traps"], serde_json::json!({}));
}

#[test]
fn a_callback_emits_at_most_100_log_lines() {
    let captured = captured_logs();
    // 150 `proxy_log` calls at info per request.
    let bytes = module(
        "",
        r#"(local $i i32)
    (loop $l
      (drop (call $log (i32.const 2) (i32.const 16) (i32.const 14)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 150))))
    (i32.const 0)"#,
        r#"(data (i32.const 16) "flood-line-xyz")"#,
    );
    let (host, registry) = host();
    let factory = host.load_bytes(&spec("flooder"), &bytes, &[]).expect("load");
    run(async {
        for _ in 0..2 {
            let mut ex = Exchange::new(&factory, "http://a.test/");
            assert!(matches!(ex.request_headers(true).await, Ok(HeadersAction::Continue)));
        }
    });
    // The quota is per callback: 100 lines of each request's, 50 dropped.
    assert_eq!(metric(&registry, "sluice_wasm_log_lines_dropped_total", r#"plugin="flooder""#), Some(100.0));
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let emitted =
        text.lines().filter(|l| l.contains("flood-line-xyz") && l.contains("plugin=\"flooder\"")).count();
    assert_eq!(emitted, 200, "{text}");
    let notes: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("guest log lines dropped") && l.contains("plugin=\"flooder\""))
        .collect();
    assert_eq!(notes.len(), 2, "{text}");
    assert!(notes.iter().all(|l| l.contains("WARN") && l.contains("dropped=50")), "{notes:?}");
}

#[test]
fn a_vm_has_at_most_1024_callouts_in_flight() {
    // 1,100 `proxy_http_call`s in one callback: the first 1,024 are accepted
    // (OK), the rest refused (INTERNAL_FAILURE); anything else traps.
    let imports = r#"
  (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))"#;
    let headers = r#"(local $i i32)
    (loop $l
      (call $expect
        (call $call (i32.const 16) (i32.const 1) (i32.const 256) (i32.const 61)
          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 32))
        (select (i32.const 0) (i32.const 10) (i32.lt_u (local.get $i) (i32.const 1024))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 1100))))
    (i32.const 0)"#;
    // Cluster `c`, and the serialized pairs `:method: GET`, `:path: /`, `:authority: a`.
    let data = r#"(data (i32.const 16) "c")
  (data (i32.const 256) "\03\00\00\00\07\00\00\00\03\00\00\00\05\00\00\00\01\00\00\00\0a\00\00\00\01\00\00\00:method\00GET\00:path\00/\00:authority\00a\00")"#;
    checks_pass("caller", imports, headers, data, &["c".to_string()]);
}

#[test]
fn a_property_path_or_value_over_1_mib_is_refused() {
    let imports = r#"
  (import "env" "proxy_set_property" (func $set (param i32 i32 i32 i32) (result i32)))"#;
    // Memory grows to ~2.1 MiB; paths and values over 1 MiB are refused (a path after its trailing NUL is cut)
    // (BAD_ARGUMENT), a small one is set; anything else traps.
    let headers = r#"(drop (memory.grow (i32.const 32)))
    (call $expect (call $set (i32.const 4096) (i32.const 1048600) (i32.const 16) (i32.const 1)) (i32.const 2))
    (call $expect (call $set (i32.const 16) (i32.const 3) (i32.const 4096) (i32.const 1048600)) (i32.const 2))
    (call $expect (call $set (i32.const 16) (i32.const 3) (i32.const 16) (i32.const 1)) (i32.const 0))
    (i32.const 0)"#;
    checks_pass("setter", imports, headers, r#"(data (i32.const 16) "abc")"#, &[]);
}

#[test]
fn a_full_vm_pool_answers_fast_and_a_freed_slot_serves_again() {
    // One VM slot for the whole process. Each load validates with a VM of its
    // own and frees it, so three filters load.
    let registry = prometheus::Registry::new();
    let options = HostOptions { max_instances: 1, ..HostOptions::default() };
    let wasm = WasmHost::new(options, &registry, Arc::new(TestCallouts::default())).expect("host");
    let bytes = module("", "(i32.const 0)", "");
    let a = wasm.load_bytes(&spec("a"), &bytes, &[]).expect("load a");
    let closed = wasm.load_bytes(&spec("closed"), &bytes, &[]).expect("load closed");
    let mut open_spec = spec("open");
    open_spec.fail_policy = FailPolicy::Open;
    let open = wasm.load_bytes(&open_spec, &bytes, &[]).expect("load open");
    let request = |factory: &Arc<dyn FilterFactory>| {
        let factory = factory.clone();
        run(async move {
            let mut ex = Exchange::new(&factory, "http://a.test/");
            let result = ex.request_headers(true).await;
            ex.log();
            result
        })
    };
    // `a`'s worker VM takes the slot.
    assert!(matches!(request(&a), Ok(HeadersAction::Continue)));

    // A load cannot validate now; its error says why.
    let Err(err) = wasm.load_bytes(&spec("late"), &bytes, &[]) else { panic!("loaded with the pool full") };
    let err = err.reason;
    assert!(err.contains("VM pool is full") && err.contains("max_instances"), "{err}");

    // A filter whose worker has no VM yet cannot get one: the request fails by
    // the filter's policy (closed: an error, the chain's 503), and nothing sticks.
    let err = request(&closed).expect_err("no VM");
    assert_eq!((err.kind, err.callback), (FilterErrorKind::Unavailable, "vm_start"));
    assert!(err.reason.contains("VM pool is full"), "{}", err.reason);
    assert!(matches!(request(&open), Ok(HeadersAction::Continue)), "fail open skips the filter");
    assert_eq!(metric(&registry, "sluice_wasm_fail_open_total", r#"plugin="open""#), Some(1.0));
    for name in ["closed", "open"] {
        let labels = format!(r#"plugin="{name}""#);
        assert_eq!(metric(&registry, "sluice_wasm_vm_pool_exhausted_total", &labels), Some(1.0));
    }
    let status = closed.status();
    assert_eq!(status["state"], "ok", "{status}");
    assert_eq!(status["pool_exhausted"], 1, "{status}");
    assert_eq!(status["traps"], serde_json::json!({}), "{status}");

    // `a` goes (as an old chain does after a swap): its VM frees the slot, and
    // the next request of `closed` gets a VM.
    drop(a);
    assert!(matches!(request(&closed), Ok(HeadersAction::Continue)));
    assert_eq!(closed.status()["vms"], 1);
    assert!(matches!(request(&open), Ok(HeadersAction::Continue)), "the slot is taken again");
    assert_eq!(metric(&registry, "sluice_wasm_vm_pool_exhausted_total", r#"plugin="open""#), Some(2.0));
}

/// Host code runs past the epoch deadline, so one host call must be bounded
/// work: 8,191 iovecs all pointing at the same 64 KiB (512 MiB in all) are
/// written 1 MiB at most, a short write the guest's libc loops on.
#[test]
fn one_fd_write_takes_at_most_1_mib() {
    let imports = r#"
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))"#;
    let checks = "(local $i i32)
    (loop $fill
      (i32.store (i32.add (i32.const 65536) (i32.mul (local.get $i) (i32.const 8))) (i32.const 0))
      (i32.store (i32.add (i32.const 65540) (i32.mul (local.get $i) (i32.const 8))) (i32.const 65536))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $fill (i32.lt_u (local.get $i) (i32.const 8191))))
    (call $expect (call $fd_write (i32.const 2) (i32.const 65536) (i32.const 8191) (i32.const 131064)) (i32.const 0))
    (call $expect (i32.load (i32.const 131064)) (i32.const 1048576))
    (i32.const 0)";
    checks_pass("writer", imports, checks, "", &[]);
}
