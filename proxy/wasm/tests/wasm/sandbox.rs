//! Sandbox and admission, with inline WAT modules.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_config::{FailPolicy, FilterSpec, ReloadPolicy};
use sluice_filter::{BodyAction, BodyBuf, FilterErrorKind, FilterFactory, HeadersAction};

use crate::common::{Exchange, host, metric, run, spec};

/// A minimal proxy-wasm module. `imports` adds imports, `headers` is the body of
/// `proxy_on_request_headers (ctx, n, eos) -> action`, `extra` adds items.
pub(crate) fn module(imports: &str, headers: &str, extra: &str) -> Vec<u8> {
    let src = format!(
        r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  {imports}
  (memory (export "memory") 2)
  (global $bump (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    {headers})
  {extra}
)"#
    );
    wat::parse_str(src).expect("valid wat")
}

fn load(spec: &FilterSpec, bytes: &[u8]) -> Result<Arc<dyn FilterFactory>, String> {
    let (host, _) = host();
    host.load_bytes(spec, bytes, &[]).map_err(|e| e.reason)
}

fn load_err(bytes: &[u8]) -> String {
    match load(&spec("bad"), bytes) {
        Ok(_) => panic!("module was accepted"),
        Err(e) => e,
    }
}

/// Runs one request through a module whose `on_request_headers` is `checks`:
/// host calls wrapped in `(call $expect CALL WANTED_STATUS)`, which traps on
/// any other status. Passes when the request continues without a trap.
/// `data` adds data segments; `clusters` are the callout clusters.
pub(crate) fn checks_pass(name: &str, imports: &str, checks: &str, data: &str, clusters: &[String]) {
    let extra = format!(
        r#"
  (func $expect (param $got i32) (param $want i32)
    (if (i32.ne (local.get $got) (local.get $want)) (then unreachable)))
  {data}"#
    );
    let bytes = module(imports, checks, &extra);
    let (host, _) = host();
    let factory = host.load_bytes(&spec(name), &bytes, clusters).expect("load");
    run(async {
        let mut ex = Exchange::new(&factory, "http://a.test/");
        let action = ex.request_headers(true).await.expect("no trap");
        assert!(matches!(action, HeadersAction::Continue));
    });
    assert_eq!(factory.status()["traps"], serde_json::json!({}));
}

#[test]
fn worker_vm_start_observes_instantiate_and_start_time() {
    let (host, registry) = host();
    let factory = host.load_bytes(&spec("starter"), &module("", "(i32.const 0)", ""), &[]).expect("load");
    let count = |name: &str| metric(&registry, name, r#"plugin="starter""#).unwrap_or(0.0);
    // The validation VM built at load is not timed; the worker VM is.
    assert_eq!(count("sluice_wasm_vm_instantiate_seconds_count"), 0.0);
    run(async {
        factory.prepare_worker();
        let mut ex = Exchange::new(&factory, "http://a.test/");
        assert!(matches!(ex.request_headers(true).await, Ok(HeadersAction::Continue)));
    });
    assert_eq!(count("sluice_wasm_vm_instantiate_seconds_count"), 1.0);
    assert_eq!(count("sluice_wasm_vm_start_seconds_count"), 1.0);
    let (instantiate, start) =
        (count("sluice_wasm_vm_instantiate_seconds_sum"), count("sluice_wasm_vm_start_seconds_sum"));
    assert!(instantiate > 0.0 && instantiate <= start, "instantiate {instantiate} s, start {start} s");
}

/// `on_vm_start` refuses to start unless memory is as the module defines it (2
/// pages; the data byte 7 at 16; zero at 20 and in the second page), then dirties
/// all of that and grows memory by a page.
fn dirtying_module() -> Vec<u8> {
    let src = r#"(module
  (memory (export "memory") 2)
  (data (i32.const 16) "\07")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (if (i32.ne (memory.size) (i32.const 2)) (then (return (i32.const 0))))
    (if (i32.ne (i32.load8_u (i32.const 16)) (i32.const 7)) (then (return (i32.const 0))))
    (if (i32.ne (i32.load (i32.const 20)) (i32.const 0)) (then (return (i32.const 0))))
    (if (i32.ne (i32.load (i32.const 70000)) (i32.const 0)) (then (return (i32.const 0))))
    (i32.store8 (i32.const 16) (i32.const 9))
    (i32.store (i32.const 20) (i32.const -1))
    (i32.store (i32.const 70000) (i32.const -1))
    (drop (memory.grow (i32.const 1)))
    (i32.store (i32.const 140000) (i32.const -1))
    (i32.const 1))
)"#;
    wat::parse_str(src).expect("valid wat")
}

#[test]
fn a_reused_pool_slot_starts_from_the_module_image() {
    // Each load builds and drops a validation VM, and each worker VM reuses a freed
    // slot whose pages were kept resident: none may see what an earlier VM wrote or
    // the memory it grew.
    let (host, registry) = host();
    let bytes = dirtying_module();
    for _ in 0..3 {
        let factory = host.load_bytes(&spec("dirty"), &bytes, &[]).expect("load: memory was pristine");
        run(async { factory.prepare_worker() });
        assert_eq!(factory.status()["state"], "ok", "{}", factory.status());
    }
    assert_eq!(metric(&registry, "sluice_wasm_vm_start_seconds_count", r#"plugin="dirty""#), Some(3.0));
}

#[test]
fn trap_fails_closed_and_names_plugin_and_callback() {
    let bytes = module(
        "",
        r#"(drop (call $log (i32.const 5) (i32.const 16) (i32.const 4))) unreachable"#,
        r#"(data (i32.const 16) "boom")"#,
    );
    let (host, registry) = host();
    let factory = host.load_bytes(&spec("trapper"), &bytes, &[]).expect("load");
    run(async {
        let mut ex = Exchange::new(&factory, "http://a.test/");
        let err = ex.request_headers(true).await.expect_err("trap");
        assert_eq!(err.kind, FilterErrorKind::Trap);
        assert_eq!(err.plugin, "trapper");
        assert_eq!(err.callback, "on_request_headers");
        assert!(err.reason.contains("boom"), "{}", err.reason);
        assert!(err.reason.contains("unreachable"), "{}", err.reason);
        assert_eq!(err.reason.matches("wasm trap").count(), 1, "said once: {}", err.reason);
        // Fail closed: the VM is not reused, later requests fail too.
        let mut ex2 = Exchange::new(&factory, "http://a.test/");
        let err = ex2.request_headers(true).await.expect_err("still failed");
        assert_eq!(err.kind, FilterErrorKind::Unavailable);
    });
    assert_eq!(metric(&registry, "sluice_wasm_traps_total", r#"kind="panic",plugin="trapper""#), Some(1.0));
    let status = factory.status();
    assert_eq!(status["state"], "failed");
    assert_eq!(status["traps"]["panic"], 1);
    assert!(status["last_error"].as_str().unwrap_or_default().contains("boom"));
}

/// The host makes `on_context_create` + `on_request_headers`, and `on_log` +
/// `on_done` + `on_delete`, one guest call each (fused entry points): a trap
/// still names the callback it happened in.
#[test]
fn a_trap_inside_a_fused_call_names_its_callback() {
    // A request context's creation traps (the root's, with parent 0, does not).
    let create_traps = wat::parse_str(
        r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32) (if (local.get 1) (then unreachable)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32)))"#,
    )
    .expect("valid wat");
    let (wasm, _) = host();
    let factory = wasm.load_bytes(&spec("creator"), &create_traps, &[]).expect("load");
    run(async {
        let mut ex = Exchange::new(&factory, "http://a.test/");
        let err = ex.request_headers(true).await.expect_err("trap");
        assert_eq!(err.kind, FilterErrorKind::Trap);
        assert_eq!(err.callback, "on_context_create");
    });

    // `on_done` traps, between `on_log` and `on_delete`.
    let done_traps = module(
        "",
        "(i32.const 0)",
        r#"(func (export "proxy_on_log") (param i32))
           (func (export "proxy_on_done") (param i32) (result i32) unreachable)
           (func (export "proxy_on_delete") (param i32))"#,
    );
    let (wasm, registry) = host();
    let factory = wasm.load_bytes(&spec("finisher"), &done_traps, &[]).expect("load");
    run(async {
        let mut ex = Exchange::new(&factory, "http://a.test/");
        assert!(matches!(ex.request_headers(true).await, Ok(HeadersAction::Continue)));
        ex.log();
    });
    assert_eq!(
        metric(&registry, "sluice_wasm_traps_total", r#"kind="unreachable",plugin="finisher""#),
        Some(1.0)
    );
    let status = factory.status();
    let last = status["last_error"].as_str().unwrap_or_default().to_string();
    assert!(last.contains("failed in on_done"), "{last}");
}

#[test]
fn infinite_loop_ends_within_budget() {
    let bytes = module("", "(loop (br 0)) (i32.const 0)", "");
    let mut s = spec("looper");
    s.limits.callback_timeout = Duration::from_millis(50);
    let (host, registry) = host();
    let factory = host.load_bytes(&s, &bytes, &[]).expect("load");
    run(async {
        let mut ex = Exchange::new(&factory, "http://a.test/");
        let started = Instant::now();
        let err = ex.request_headers(true).await.expect_err("deadline");
        let elapsed = started.elapsed();
        assert_eq!(err.kind, FilterErrorKind::Timeout);
        assert!(elapsed >= Duration::from_millis(40), "{elapsed:?}");
        // Budget + one 10 ms tick, plus scheduling slack on a loaded CI box (the
        // epoch ticker is a thread too): an infinite loop ends only at the deadline.
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    });
    assert_eq!(
        metric(&registry, "sluice_wasm_timeouts_total", r#"plugin="looper",what="callback""#),
        Some(1.0)
    );
}

#[test]
fn a_request_paused_forever_ends_at_the_pause_timeout() {
    // `on_request_headers` pauses and nothing ever resumes it (no callout, no
    // continue): the request fails by its policy when `pause_timeout` passes.
    let bytes = module("", "(i32.const 1)", "");
    let mut s = spec("sleeper");
    s.limits.pause_timeout = Duration::from_millis(100);
    let (host, registry) = host();
    let factory = host.load_bytes(&s, &bytes, &[]).expect("load");
    run(async {
        for round in 1..=2 {
            let mut ex = Exchange::new(&factory, "http://a.test/");
            let started = Instant::now();
            let err = ex.request_headers(true).await.expect_err("pause timeout");
            let elapsed = started.elapsed();
            assert_eq!((err.kind, err.callback), (FilterErrorKind::Timeout, "on_request_headers"));
            assert!(err.reason.contains("100 ms pause_timeout"), "{}", err.reason);
            assert!(
                elapsed >= Duration::from_millis(100) && elapsed < Duration::from_secs(10),
                "{elapsed:?}"
            );
            ex.log();
            let timeouts =
                metric(&registry, "sluice_wasm_timeouts_total", r#"plugin="sleeper",what="pause""#);
            assert_eq!(timeouts, Some(f64::from(round)));
        }
    });
    // A pause timeout is the request's, not the VM's: nothing trapped, the VM serves on.
    let status = factory.status();
    assert_eq!(
        (status["state"].as_str(), status["pause_timeouts"].as_u64()),
        (Some("ok"), Some(2)),
        "{status}"
    );
    assert_eq!(status["traps"], serde_json::json!({}));
}

#[test]
fn memory_growth_past_the_cap_is_refused() {
    // Grows by 2000 pages (125 MiB) over an 8 MiB cap: memory.grow returns -1,
    // which the guest checks; then it traps as a Rust allocator would.
    let bytes = module(
        "",
        r#"(if (i32.ne (memory.grow (i32.const 2000)) (i32.const -1)) (then (return (i32.const 0))))
           unreachable"#,
        "",
    );
    let (host, _) = host();
    let factory = host.load_bytes(&spec("grower"), &bytes, &[]).expect("load");
    run(async {
        let mut ex = Exchange::new(&factory, "http://a.test/");
        let err = ex.request_headers(true).await.expect_err("oom");
        assert_eq!(err.kind, FilterErrorKind::OutOfMemory);
        assert!(err.reason.contains("out of memory"), "{}", err.reason);
    });
}

#[test]
fn initial_memory_over_the_cap_is_rejected_at_load() {
    let src = module("", "(i32.const 0)", "");
    let mut s = spec("big");
    s.limits.memory_bytes = 64 * 1024; // one page; the module wants two
    let err = match load(&s, &src) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    assert!(err.contains("instantiate"), "{err}");
}

#[test]
fn unbounded_recursion_is_a_trap_not_an_abort() {
    let bytes = module("", "(call $recurse) (i32.const 0)", "(func $recurse (call $recurse))");
    let (host, _) = host();
    let factory = host.load_bytes(&spec("recurser"), &bytes, &[]).expect("load");
    run(async {
        let mut ex = Exchange::new(&factory, "http://a.test/");
        let err = ex.request_headers(true).await.expect_err("stack overflow");
        assert_eq!(err.kind, FilterErrorKind::Trap);
        assert!(err.reason.contains("call stack exhausted"), "{}", err.reason);
    });
}

#[test]
fn hostile_pointers_get_invalid_memory_access() {
    // Each host call gets out-of-bounds or huge pointers/lengths and must return
    // INVALID_MEMORY_ACCESS (6) or BAD_ARGUMENT (2); anything else traps.
    let imports = r#"
  (import "env" "proxy_get_header_map_pairs" (func $pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $sset (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))"#;
    let headers = r#"
    (call $expect (call $log (i32.const 2) (i32.const -16) (i32.const 100)) (i32.const 6))
    (call $expect (call $log (i32.const 2) (i32.const 0) (i32.const -1)) (i32.const 6))
    (call $expect (call $log (i32.const 9) (i32.const 0) (i32.const 0)) (i32.const 2))
    (call $expect (call $pairs (i32.const 0) (i32.const -4) (i32.const 8)) (i32.const 6))
    (call $expect (call $pairs (i32.const 99) (i32.const 8) (i32.const 12)) (i32.const 2))
    (call $expect (call $value (i32.const 0) (i32.const 131000) (i32.const 1000) (i32.const 8) (i32.const 12)) (i32.const 6))
    (call $expect (call $add (i32.const 0) (i32.const 16) (i32.const 3) (i32.const 2147483647) (i32.const 2147483647)) (i32.const 6))
    (call $expect (call $prop (i32.const -1) (i32.const 10) (i32.const 8) (i32.const 12)) (i32.const 6))
    (call $expect (call $sset (i32.const 16) (i32.const 3) (i32.const 0) (i32.const -1) (i32.const 0)) (i32.const 6))
    (call $expect (call $local (i32.const 200) (i32.const 0) (i32.const 0) (i32.const -100) (i32.const 200) (i32.const 0) (i32.const 0) (i32.const -1)) (i32.const 6))
    (call $expect (call $call (i32.const 16) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 10) (i32.const -4)) (i32.const 6))
    (call $expect (call $fd_write (i32.const 1) (i32.const -8) (i32.const 1) (i32.const 8)) (i32.const 21))
    (i32.const 0)"#;
    checks_pass("hostile", imports, headers, r#"(data (i32.const 16) "abc")"#, &[]);
}

#[test]
fn missing_exports_are_rejected() {
    let no_ctx = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))
           (func (export "malloc") (param i32) (result i32) (i32.const 0)))"#,
    )
    .expect("wat");
    assert!(load_err(&no_ctx).contains("missing export `proxy_on_context_create`"));
    let no_alloc = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))
           (func (export "proxy_on_context_create") (param i32 i32)))"#,
    )
    .expect("wat");
    assert!(load_err(&no_alloc).contains("missing allocator export"));
    let bad_sig = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))
           (func (export "malloc") (param i32) (result i32) (i32.const 0))
           (func (export "proxy_on_context_create") (param i32 i32))
           (func (export "proxy_on_request_headers") (param i32) (result i32) (i32.const 0)))"#,
    )
    .expect("wat");
    let err = load_err(&bad_sig);
    assert!(err.contains("`proxy_on_request_headers` has signature"), "{err}");
}

#[test]
fn unknown_or_missing_abi_version_is_rejected() {
    let v3 =
        wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_3_0")))"#)
            .expect("wat");
    let err = load_err(&v3);
    assert!(err.contains("unsupported proxy-wasm ABI version marker `proxy_abi_version_0_3_0`"), "{err}");
    let none = wat::parse_str(r#"(module (memory (export "memory") 1))"#).expect("wat");
    assert!(load_err(&none).contains("no proxy-wasm ABI version marker"));
}

#[test]
fn disallowed_imports_are_rejected_by_name() {
    let env = module(r#"(import "env" "evil" (func (param i32)))"#, "(i32.const 0)", "");
    assert!(load_err(&env).contains("disallowed import `env::evil`"));
    let sock = module(
        r#"(import "wasi_snapshot_preview1" "sock_accept" (func (param i32 i32 i32) (result i32)))"#,
        "(i32.const 0)",
        "",
    );
    let err = load_err(&sock);
    assert!(err.contains("disallowed import `wasi_snapshot_preview1::sock_accept`"), "{err}");
    let fs = module(
        r#"(import "wasi_snapshot_preview1" "path_open" (func (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))"#,
        "(i32.const 0)",
        "",
    );
    assert!(load_err(&fs).contains("path_open"));
    let other = module(r#"(import "spectest" "print" (func))"#, "(i32.const 0)", "");
    assert!(load_err(&other).contains("disallowed import `spectest::print`"));
    let wrong_sig =
        module(r#"(import "env" "proxy_done" (func (param i32) (result i32)))"#, "(i32.const 0)", "");
    assert!(load_err(&wrong_sig).contains("proxy_done"));
}

#[test]
fn text_and_garbage_uploads_are_rejected() {
    assert!(load_err(b"(module)").contains("not a WebAssembly binary"));
    assert!(load_err(b"\0asm\x01\0\0\0garbage").contains("invalid module"));
    let mut s = spec("huge");
    s.limits.max_module_bytes = 16;
    let bytes = module("", "(i32.const 0)", "");
    assert!(load(&s, &bytes).err().unwrap_or_default().contains("over the 16-byte limit"));
}

#[test]
fn gc_and_exception_proposal_modules_are_rejected_at_load() {
    // The engine is built without the GC and exception-handling proposals
    // (proxy-wasm SDKs emit neither; leaving them out makes every guest call cheaper).
    let gc = module("", "(i32.const 0)", "(type $point (struct (field i32)))");
    let err = load_err(&gc);
    assert!(err.contains("invalid module") && err.contains("gc"), "{err}");
    let eh = module("", "(i32.const 0)", "(tag $oops)");
    let err = load_err(&eh);
    assert!(err.contains("invalid module") && err.contains("exception"), "{err}");
}

#[test]
fn on_configure_false_is_rejected_with_the_plugin_log() {
    let src = r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $log (i32.const 4) (i32.const 16) (i32.const 18)))
    (i32.const 0))
  (data (i32.const 16) "missing key `port`"))"#;
    let err = load_err(&wat::parse_str(src).expect("wat"));
    assert!(err.contains("on_configure returned false"), "{err}");
    assert!(err.contains("missing key `port`"), "{err}");
}

/// Traps only for `/boom`.
fn boom_module() -> Vec<u8> {
    module(
        r#"(import "env" "proxy_get_header_map_value" (func $value (param i32 i32 i32 i32 i32) (result i32)))"#,
        r#"(drop (call $value (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 32) (i32.const 36)))
           ;; The path's first two bytes are "/b" for "/boom".
           (if (i32.eq (i32.load16_u (i32.load (i32.const 32))) (i32.const 0x622f)) (then unreachable))
           (i32.const 0)"#,
        r#"(data (i32.const 16) ":path")"#,
    )
}

#[test]
fn fail_open_skips_the_filter_and_counts() {
    let mut s = spec("opener");
    s.fail_policy = FailPolicy::Open;
    let (host, registry) = host();
    let factory = host.load_bytes(&s, &boom_module(), &[]).expect("load");
    run(async {
        let mut ex = Exchange::new(&factory, "http://a.test/boom");
        ex.req.headers.insert("x-kept", http::HeaderValue::from_static("yes"));
        assert!(matches!(ex.request_headers(true).await, Ok(HeadersAction::Continue)));
        // The head the guest trapped over comes back whole.
        assert_eq!(ex.req.uri.path(), "/boom");
        assert_eq!(ex.req.headers.get("x-kept").map(|v| v.as_bytes()), Some(&b"yes"[..]));
        let mut ex = Exchange::new(&factory, "http://a.test/fine");
        assert!(matches!(ex.request_headers(true).await, Ok(HeadersAction::Continue)));
    });
    assert_eq!(metric(&registry, "sluice_wasm_fail_open_total", r#"plugin="opener""#), Some(2.0));
    assert_eq!(factory.status()["fail_open_passes"], 2);
}

#[test]
fn fail_reload_builds_a_fresh_vm_after_backoff_with_a_crash_loop_cap() {
    let mut s = spec("reloader");
    // Backoffs long enough that a stalled CI machine still asks during them.
    s.fail_policy = FailPolicy::Reload(ReloadPolicy {
        base: Duration::from_millis(500),
        max: Duration::from_secs(5),
        max_consecutive: 2,
    });
    let (host, registry) = host();
    let factory = host.load_bytes(&s, &boom_module(), &[]).expect("load");
    run(async {
        let mut ex = Exchange::new(&factory, "http://a.test/boom");
        assert_eq!(ex.request_headers(true).await.expect_err("503 now").kind, FilterErrorKind::Trap);
        assert_eq!(factory.status()["state"], "reloading");
        // During the backoff: unavailable.
        let mut ex = Exchange::new(&factory, "http://a.test/fine");
        assert_eq!(ex.request_headers(true).await.expect_err("backoff").kind, FilterErrorKind::Unavailable);
        // After it: a fresh VM serves.
        tokio::time::sleep(Duration::from_millis(650)).await;
        let mut ex = Exchange::new(&factory, "http://a.test/fine");
        assert!(matches!(ex.request_headers(true).await, Ok(HeadersAction::Continue)));
        ex.log();
        assert_eq!(factory.status()["state"], "ok");
        // Crash loop: trap, reload, trap, reload, trap => failed for good.
        // Past each doubled backoff (1 s, then 2 s).
        for wait in [1_100u64, 2_100] {
            let mut ex = Exchange::new(&factory, "http://a.test/boom");
            assert!(ex.request_headers(true).await.is_err());
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        let mut ex = Exchange::new(&factory, "http://a.test/boom");
        assert!(ex.request_headers(true).await.is_err());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut ex = Exchange::new(&factory, "http://a.test/fine");
        assert_eq!(ex.request_headers(true).await.expect_err("capped").kind, FilterErrorKind::Unavailable);
    });
    assert_eq!(factory.status()["state"], "failed");
    assert_eq!(metric(&registry, "sluice_wasm_reloads_total", r#"plugin="reloader""#), Some(3.0));
}

/// The foreign function `sluice.noop_http_callbacks`: callbacks a guest
/// declares no-ops are no longer called (these trap if they are), the others
/// still are, and a trailers callback counts only with its body's.
#[test]
fn callbacks_declared_no_ops_are_skipped() {
    // Declares response headers, response trailers (ignored: the body callback
    // is not declared), on_log and on_done (0xe8). Request headers checks that
    // every earlier request's context was deleted, and the status answers:
    // NotFound for another name, BadArgument for a short argument.
    let bytes = module(
        r#"(import "env" "proxy_call_foreign_function" (func $ff (param i32 i32 i32 i32 i32 i32) (result i32)))"#,
        r#"(if (i32.ne (global.get $started) (global.get $deleted)) (then unreachable))
           (global.set $started (i32.add (global.get $started) (i32.const 1)))
           (if (i32.ne (call $ff (i32.const 80) (i32.const 4) (i32.const 64) (i32.const 4) (i32.const 0) (i32.const 0))
                       (i32.const 1)) (then unreachable))
           (if (i32.ne (call $ff (i32.const 16) (i32.const 26) (i32.const 64) (i32.const 3) (i32.const 0) (i32.const 0))
                       (i32.const 2)) (then unreachable))
           (if (i32.ne (call $ff (i32.const 16) (i32.const 26) (i32.const 64) (i32.const 4) (i32.const 0) (i32.const 0))
                       (i32.const 0)) (then unreachable))
           (i32.const 0)"#,
        r#"(data (i32.const 16) "sluice.noop_http_callbacks")
           (data (i32.const 64) "\e8\00\00\00")
           (data (i32.const 80) "nope")
           (global $started (mut i32) (i32.const 0))
           (global $deleted (mut i32) (i32.const 0))
           (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) unreachable)
           (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) (i32.const 1))
           (func (export "proxy_on_response_trailers") (param i32 i32) (result i32) (i32.const 1))
           (func (export "proxy_on_log") (param i32) unreachable)
           (func (export "proxy_on_done") (param i32) (result i32) unreachable)
           (func (export "proxy_on_delete") (param i32)
             (global.set $deleted (i32.add (global.get $deleted) (i32.const 1))))"#,
    );
    let (host, _) = host();
    let factory = host.load_bytes(&spec("quiet"), &bytes, &[]).expect("load");
    run(async {
        for _ in 0..3 {
            let mut ex = Exchange::new(&factory, "http://a.test/");
            assert!(matches!(ex.request_headers(false).await, Ok(HeadersAction::Continue)));
            assert!(matches!(ex.response_headers(false).await, Ok(HeadersAction::Continue)));
            // The body callback runs: it asks to buffer.
            let mut body = BodyBuf::new();
            body.extend_from_slice(b"chunk");
            assert!(matches!(ex.response_body(&mut body, false).await, Ok(BodyAction::Buffer)));
            assert!(!ex.filter.ignores_response(false), "its response body callback is not declared");
            // So do trailers: they pause.
            let mut trailers = http::HeaderMap::new();
            let paused = ex.filter.on_response_trailers(&mut trailers, &ex.info);
            assert!(matches!(paused, Ok(HeadersAction::Pause)));
            ex.log();
        }
    });
    let status = factory.status();
    assert_eq!(status["state"], "ok", "{status}");
    assert_eq!(status["traps"], serde_json::json!({}), "{status}");
    assert_eq!(status["noop_callbacks"], serde_json::json!(["on_response_headers", "on_log", "on_done"]));
}

/// A module whose request-headers callback declares `bits` (a WAT data
/// string) and whose callbacks after the response head trap if called.
fn declaring_after_head(bits: &str) -> Vec<u8> {
    module(
        r#"(import "env" "proxy_call_foreign_function" (func $ff (param i32 i32 i32 i32 i32 i32) (result i32)))"#,
        r#"(if (i32.ne (global.get $started) (global.get $deleted)) (then unreachable))
           (global.set $started (i32.add (global.get $started) (i32.const 1)))
           (drop (call $ff (i32.const 16) (i32.const 26) (i32.const 64) (i32.const 4) (i32.const 0) (i32.const 0)))
           (i32.const 0)"#,
        &format!(
            r#"(data (i32.const 16) "sluice.noop_http_callbacks")
           (data (i32.const 64) "{bits}")
           (global $started (mut i32) (i32.const 0))
           (global $deleted (mut i32) (i32.const 0))
           (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) unreachable)
           (func (export "proxy_on_response_trailers") (param i32 i32) (result i32) unreachable)
           (func (export "proxy_on_log") (param i32) unreachable)
           (func (export "proxy_on_done") (param i32) (result i32) unreachable)
           (func (export "proxy_on_delete") (param i32)
             (global.set $deleted (i32.add (global.get $deleted) (i32.const 1))))"#
        ),
    )
}

/// A guest that declared every callback after the response head a no-op
/// (0xf0: response body and trailers, on_log, on_done) tells the chain so,
/// which then leaves the response body unwrapped and keeps no head for on_log.
/// Those callbacks trap if called; on_delete still runs.
#[test]
fn a_filter_that_declared_the_rest_of_the_response_ignores_it() {
    let (host, _) = host();
    let factory =
        host.load_bytes(&spec("ignores"), &declaring_after_head(r"\f0\00\00\00"), &[]).expect("load");
    run(async {
        for _ in 0..3 {
            let mut ex = Exchange::new(&factory, "http://a.test/");
            assert!(!ex.filter.ignores_response(false), "no context yet");
            assert!(matches!(ex.request_headers(false).await, Ok(HeadersAction::Continue)));
            assert!(matches!(ex.response_headers(false).await, Ok(HeadersAction::Continue)));
            assert!(ex.filter.ignores_response(true));
            // Were they called anyway, they would return at once.
            let mut body = BodyBuf::new();
            body.extend_from_slice(b"chunk");
            assert!(matches!(ex.response_body(&mut body, true).await, Ok(BodyAction::Continue)));
            ex.log();
        }
    });
    let status = factory.status();
    assert_eq!(status["state"], "ok", "{status}");
    assert_eq!(status["traps"], serde_json::json!({}), "{status}");
    assert_eq!(
        status["noop_callbacks"],
        serde_json::json!(["on_response_body", "on_response_trailers", "on_log", "on_done"])
    );
}

/// Without the trailers callback (0xd0), the rest of the response is ignored
/// only when no trailers can come (an HTTP/1.1 response of known length).
#[test]
fn a_filter_that_keeps_its_trailers_callback_ignores_only_a_response_without_trailers() {
    let (host, _) = host();
    let factory =
        host.load_bytes(&spec("no-trailers"), &declaring_after_head(r"\d0\00\00\00"), &[]).expect("load");
    run(async {
        let mut ex = Exchange::new(&factory, "http://a.test/");
        assert!(matches!(ex.request_headers(false).await, Ok(HeadersAction::Continue)));
        assert!(ex.filter.ignores_response(false));
        assert!(!ex.filter.ignores_response(true), "trailers may still come, and would reach the guest");
        ex.log();
    });
    let status = factory.status();
    assert_eq!(status["noop_callbacks"], serde_json::json!(["on_response_body", "on_log", "on_done"]));
}

#[test]
fn header_statuses_read_as_envoy_reads_them() {
    // C++ SDK filters may return any FilterHeadersStatus: ContinueAndEndStream
    // (2) and unknown values continue; StopAllIteration* (3, 4) stop, as 1 does.
    run(async {
        for (action, stops) in [(0, false), (1, true), (2, false), (3, true), (4, true), (5, false)] {
            let mut s = spec("statuses");
            s.limits.pause_timeout = Duration::from_millis(50);
            let (host, _) = host();
            let factory =
                host.load_bytes(&s, &module("", &format!("(i32.const {action})"), ""), &[]).expect("load");
            let mut ex = Exchange::new(&factory, "http://a.test/");
            let r = ex.request_headers(true).await;
            match stops {
                false => assert!(matches!(r, Ok(HeadersAction::Continue)), "{action}"),
                // Nothing resumes it: the pause timeout ends it.
                true => assert_eq!(r.expect_err("paused").kind, FilterErrorKind::Timeout, "{action}"),
            }
        }
    });
}
