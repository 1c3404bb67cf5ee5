//! Builds the example filter for both wasm targets with the real toolchain and
//! checks the module's ABI surface: the version marker, the allocator(s), every
//! `proxy_on_*` callback with its exact signature, and only known imports.
#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use wasmparser::{CompositeInnerType, ExternalKind, Parser, Payload, TypeRef, ValType};

/// (params, results) as wasm value types.
type Sig = (Vec<ValType>, Vec<ValType>);

fn sig(params: usize, result: bool) -> Sig {
    (vec![ValType::I32; params], if result { vec![ValType::I32] } else { vec![] })
}

/// Every callback ABI v0.2.1 defines, with its signature.
fn expected_exports() -> Vec<(&'static str, Sig)> {
    use sluice_abi::exports::*;
    vec![
        (ON_CONTEXT_CREATE, sig(2, false)),
        (ON_VM_START, sig(2, true)),
        (ON_CONFIGURE, sig(2, true)),
        (ON_TICK, sig(1, false)),
        (ON_QUEUE_READY, sig(2, false)),
        (ON_DONE, sig(1, true)),
        (ON_LOG, sig(1, false)),
        (ON_DELETE, sig(1, false)),
        (ON_FOREIGN_FUNCTION, sig(3, false)),
        (ON_NEW_CONNECTION, sig(1, true)),
        (ON_DOWNSTREAM_DATA, sig(3, true)),
        (ON_UPSTREAM_DATA, sig(3, true)),
        (ON_DOWNSTREAM_CONNECTION_CLOSE, sig(2, false)),
        (ON_UPSTREAM_CONNECTION_CLOSE, sig(2, false)),
        (ON_REQUEST_HEADERS, sig(3, true)),
        (ON_REQUEST_BODY, sig(3, true)),
        (ON_REQUEST_TRAILERS, sig(2, true)),
        (ON_RESPONSE_HEADERS, sig(3, true)),
        (ON_RESPONSE_BODY, sig(3, true)),
        (ON_RESPONSE_TRAILERS, sig(2, true)),
        (ON_HTTP_CALL_RESPONSE, sig(5, false)),
        (ON_GRPC_RECEIVE_INITIAL_METADATA, sig(3, false)),
        (ON_GRPC_RECEIVE, sig(3, false)),
        (ON_GRPC_RECEIVE_TRAILING_METADATA, sig(3, false)),
        (ON_GRPC_CLOSE, sig(3, false)),
        (ON_MEMORY_ALLOCATE, sig(1, true)),
        (sluice_abi::version::V0_2_1, sig(0, false)),
        (INITIALIZE, sig(0, false)),
    ]
}

/// Every `env` import ABI v0.2.1 defines, with its signature.
fn known_imports() -> HashMap<&'static str, Sig> {
    let mut m: HashMap<&'static str, Sig> = [
        ("proxy_log", 3),
        ("proxy_get_log_level", 1),
        ("proxy_get_current_time_nanoseconds", 1),
        ("proxy_set_tick_period_milliseconds", 1),
        ("proxy_set_effective_context", 1),
        ("proxy_done", 0),
        ("proxy_get_buffer_bytes", 5),
        ("proxy_get_buffer_status", 3),
        ("proxy_set_buffer_bytes", 5),
        ("proxy_get_header_map_pairs", 3),
        ("proxy_set_header_map_pairs", 3),
        ("proxy_get_header_map_size", 2),
        ("proxy_get_header_map_value", 5),
        ("proxy_add_header_map_value", 5),
        ("proxy_replace_header_map_value", 5),
        ("proxy_remove_header_map_value", 3),
        ("proxy_continue_stream", 1),
        ("proxy_close_stream", 1),
        ("proxy_send_local_response", 8),
        ("proxy_get_status", 3),
        ("proxy_http_call", 10),
        ("proxy_grpc_call", 12),
        ("proxy_grpc_stream", 9),
        ("proxy_grpc_send", 4),
        ("proxy_grpc_cancel", 1),
        ("proxy_grpc_close", 1),
        ("proxy_get_shared_data", 5),
        ("proxy_set_shared_data", 5),
        ("proxy_register_shared_queue", 3),
        ("proxy_resolve_shared_queue", 5),
        ("proxy_enqueue_shared_queue", 3),
        ("proxy_dequeue_shared_queue", 3),
        ("proxy_define_metric", 4),
        ("proxy_get_metric", 2),
        ("proxy_get_property", 4),
        ("proxy_set_property", 4),
        ("proxy_call_foreign_function", 6),
    ]
    .into_iter()
    .map(|(name, n)| (name, sig(n, true)))
    .collect();
    m.insert("proxy_increment_metric", (vec![ValType::I32, ValType::I64], vec![ValType::I32]));
    m.insert("proxy_record_metric", (vec![ValType::I32, ValType::I64], vec![ValType::I32]));
    m
}

struct Module {
    /// (module, name) -> signature.
    imports: HashMap<(String, String), Sig>,
    /// name -> signature (functions), or None for other kinds.
    exports: HashMap<String, Option<Sig>>,
}

fn parse(bytes: &[u8]) -> Module {
    let mut types: Vec<Sig> = Vec::new();
    let mut func_types: Vec<u32> = Vec::new();
    let mut imports = HashMap::new();
    let mut raw_exports = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.unwrap() {
            Payload::TypeSection(reader) => {
                for group in reader {
                    for sub in group.unwrap().into_types() {
                        match &sub.composite_type.inner {
                            CompositeInnerType::Func(f) => {
                                types.push((f.params().to_vec(), f.results().to_vec()))
                            }
                            _ => types.push((vec![], vec![])),
                        }
                    }
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.unwrap();
                    if let TypeRef::Func(t) = import.ty {
                        func_types.push(t);
                        imports.insert(
                            (import.module.to_string(), import.name.to_string()),
                            types[t as usize].clone(),
                        );
                    }
                }
            }
            Payload::FunctionSection(reader) => {
                for t in reader {
                    func_types.push(t.unwrap());
                }
            }
            Payload::ExportSection(reader) => {
                for e in reader {
                    let e = e.unwrap();
                    raw_exports.push((e.name.to_string(), e.kind, e.index));
                }
            }
            _ => {}
        }
    }
    let exports = raw_exports
        .into_iter()
        .map(|(name, kind, index)| {
            let sig =
                (kind == ExternalKind::Func).then(|| types[func_types[index as usize] as usize].clone());
            (name, sig)
        })
        .collect();
    Module { imports, exports }
}

fn build_example(target: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap();
    let target_dir = root.join("target").join("wasm-fixtures");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["build", "-p", "sluice-sdk", "--example", "header_auth", "--target", target, "--target-dir"])
        .arg(&target_dir)
        .status()
        .unwrap();
    assert!(status.success(), "building the example for {target} failed");
    target_dir.join(target).join("debug").join("examples").join("header_auth.wasm")
}

fn check(target: &str) -> Module {
    let path = build_example(target);
    let bytes = std::fs::read(&path).unwrap();
    let module = parse(&bytes);

    for (name, expected) in expected_exports() {
        match module.exports.get(name) {
            Some(Some(actual)) => assert_eq!(actual, &expected, "{target}: signature of export {name}"),
            other => panic!("{target}: export {name} missing or not a function: {other:?}"),
        }
    }
    assert!(matches!(module.exports.get("memory"), Some(None)), "{target}: memory must be exported");

    let known = known_imports();
    for ((m, name), actual) in &module.imports {
        match m.as_str() {
            "env" => match known.get(name.as_str()) {
                Some(expected) => assert_eq!(actual, expected, "{target}: signature of import {name}"),
                None => panic!("{target}: unknown env import {name}"),
            },
            "wasi_snapshot_preview1" => assert_eq!(target, "wasm32-wasip1", "unexpected WASI import {name}"),
            other => panic!("{target}: import from unexpected module {other}::{name}"),
        }
    }
    // What the example uses must be linked to the host.
    for used in [
        "proxy_log",
        "proxy_get_header_map_value",
        "proxy_replace_header_map_value",
        "proxy_remove_header_map_value",
        "proxy_send_local_response",
        "proxy_http_call",
        "proxy_continue_stream",
        "proxy_set_effective_context",
        "proxy_define_metric",
        "proxy_increment_metric",
        "proxy_get_buffer_bytes",
    ] {
        assert!(
            module.imports.contains_key(&("env".to_string(), used.to_string())),
            "{target}: missing import {used}"
        );
    }
    module
}

#[test]
fn example_filter_has_the_abi_surface_on_both_targets() {
    let wasi = check("wasm32-wasip1");
    assert!(!wasi.exports.contains_key("malloc"), "wasip1: malloc belongs to wasi-libc and stays internal");
    let unknown = check("wasm32-unknown-unknown");
    assert_eq!(unknown.exports.get("malloc"), Some(&Some(sig(1, true))), "unknown-unknown exports malloc");
}
