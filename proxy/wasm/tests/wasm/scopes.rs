//! Shared data is scoped per plugin, or shared by the plugins naming the same
//! `vm_id` (Envoy's `vm_config.vm_id`).

use crate::common::{host, request_header_set, spec};
use crate::sandbox::module;

const IMPORTS: &str = r#"
  (import "env" "proxy_get_shared_data" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))"#;
const DATA: &str = r#"(data (i32.const 16) "k") (data (i32.const 24) "v") (data (i32.const 32) "x-k")"#;

/// Sets the shared-data key `k` to `v`.
fn writer() -> Vec<u8> {
    let set = "(drop (call $set (i32.const 16) (i32.const 1) (i32.const 24) (i32.const 1) (i32.const 0))) (i32.const 0)";
    module(IMPORTS, set, DATA)
}

/// Copies the shared-data key `k`, if it finds it, to the request header `x-k`.
fn reader() -> Vec<u8> {
    let get = r#"
    (if (i32.eqz (call $get (i32.const 16) (i32.const 1) (i32.const 64) (i32.const 68) (i32.const 72)))
      (then (drop (call $add (i32.const 0) (i32.const 32) (i32.const 3) (i32.load (i32.const 64)) (i32.load (i32.const 68))))))
    (i32.const 0)"#;
    module(IMPORTS, get, DATA)
}

/// What the reader `r` sees after the writer `w` ran.
fn seen(w_vm_id: Option<&str>, r_vm_id: Option<&str>, names: (&str, &str)) -> Option<String> {
    let (host, _) = host();
    let mut w = spec(names.0);
    w.vm_id = w_vm_id.map(str::to_owned);
    let mut r = spec(names.1);
    r.vm_id = r_vm_id.map(str::to_owned);
    let w = host.load_bytes(&w, &writer(), &[]).expect("load writer");
    let r = host.load_bytes(&r, &reader(), &[]).expect("load reader");
    // The admin page shows the scope.
    assert_eq!(w.status()["vm_id"], w_vm_id.unwrap_or(names.0));
    request_header_set(&w, "x-k");
    request_header_set(&r, "x-k")
}

#[test]
fn shared_data_is_per_plugin_unless_plugins_name_one_vm_id() {
    assert_eq!(seen(None, None, ("writer", "reader")), None);
    assert_eq!(seen(Some("cache"), Some("other"), ("writer", "reader")), None);
    assert_eq!(seen(Some("cache"), Some("cache"), ("writer", "reader")).as_deref(), Some("v"));
    // A plugin without a vm_id is scoped by its name, so it may join another's vm_id.
    assert_eq!(seen(None, Some("writer"), ("writer", "reader")).as_deref(), Some("v"));
}
