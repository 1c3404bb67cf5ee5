//! A VM's start and end as on Envoy: a reactor's `main` after `_initialize`;
//! the root context's `on_done` then `on_delete` when its VM is dropped
//! without having failed (its filter unloaded or replaced).

use crate::common::{host, request_header_set, spec};
use crate::sandbox::module;

/// The root context (id 1) adds one to the shared-data counter `downs` in
/// `on_done` and one in `on_delete`; each request reports the counter in the
/// request header `x-downs`.
fn counting_module() -> Vec<u8> {
    let imports = r#"
  (import "env" "proxy_get_shared_data" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))"#;
    let headers = r#"
    (if (i32.eqz (call $get (i32.const 16) (i32.const 5) (i32.const 64) (i32.const 68) (i32.const 72)))
      (then (drop (call $add (i32.const 0) (i32.const 32) (i32.const 7) (i32.load (i32.const 64)) (i32.load (i32.const 68))))))
    (i32.const 0)"#;
    let extra = r#"
  (data (i32.const 16) "downs")
  (data (i32.const 32) "x-downs")
  ;; One more on the counter (an ASCII digit), for the root context only.
  (func $count (param $ctx i32)
    (local $n i32)
    (if (i32.ne (local.get $ctx) (i32.const 1)) (then (return)))
    (local.set $n (i32.const 48))
    (if (i32.eqz (call $get (i32.const 16) (i32.const 5) (i32.const 64) (i32.const 68) (i32.const 72)))
      (then (local.set $n (i32.load8_u (i32.load (i32.const 64))))))
    (i32.store8 (i32.const 80) (i32.add (local.get $n) (i32.const 1)))
    (drop (call $set (i32.const 16) (i32.const 5) (i32.const 80) (i32.const 1) (i32.const 0))))
  (func (export "proxy_on_done") (param $ctx i32) (result i32) (call $count (local.get $ctx)) (i32.const 1))
  (func (export "proxy_on_delete") (param $ctx i32) (call $count (local.get $ctx)))"#;
    module(imports, headers, extra)
}

#[test]
fn a_dropped_vm_ends_its_root_context_with_on_done_then_on_delete() {
    let (host, _) = host();
    let bytes = counting_module();
    // The VM that validated the module at load is dropped: 2.
    let factory = host.load_bytes(&spec("ender"), &bytes, &[]).expect("load");
    assert_eq!(request_header_set(&factory, "x-downs").as_deref(), Some("2"));
    // The filter is unloaded: its worker VM ends (4); a new version loads (6).
    drop(factory);
    let factory = host.load_bytes(&spec("ender"), &bytes, &[]).expect("load again");
    assert_eq!(request_header_set(&factory, "x-downs").as_deref(), Some("6"));
}

/// A reactor whose `_initialize` writes `1` and whose `main_export` writes `2`
/// after it (if it runs after it); requests report what was written in `x-init`.
fn reactor(main_export: &str) -> Vec<u8> {
    let imports = r#"
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))"#;
    let headers = "(drop (call $add (i32.const 0) (i32.const 32) (i32.const 6) (i32.const 100) (i32.const 2))) (i32.const 0)";
    let extra = format!(
        r#"(data (i32.const 32) "x-init") (data (i32.const 100) "--")
  (func (export "_initialize") (i32.store8 (i32.const 100) (i32.const 49)))
  (func $second (if (i32.eq (i32.load8_u (i32.const 100)) (i32.const 49)) (then (i32.store8 (i32.const 101) (i32.const 50)))))
  {main_export}"#
    );
    module(imports, headers, &extra)
}

#[test]
fn a_reactors_main_runs_after_initialize_as_on_envoy() {
    for (export, seen) in [
        (r#"(func (export "main") (param i32 i32) (result i32) (call $second) (i32.const 0))"#, "12"),
        (r#"(func (export "__main_void") (result i32) (call $second) (i32.const 0))"#, "12"),
        // Another signature is not a C `main`: not called.
        (r#"(func (export "main") (call $second))"#, "1-"),
    ] {
        let (host, _) = host();
        let factory = host.load_bytes(&spec("reactor"), &reactor(export), &[]).expect("load");
        assert_eq!(request_header_set(&factory, "x-init").as_deref(), Some(seen), "{export}");
    }
}
