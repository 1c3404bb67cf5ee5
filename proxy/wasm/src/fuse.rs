//! Fused entry points: guest calls the host makes back to back, made as one.
//!
//! Every call into the guest pays a host→wasm transition (about 160
//! instructions in wasmtime, plus the host's deadline and call-frame
//! bookkeeping), which for a small filter is as much as the guest's own work.
//! Twice per request the ABI has the host call the guest several times with
//! nothing in between:
//!
//! - when a request starts, `proxy_on_context_create` then `proxy_on_request_headers`;
//! - when it ends, `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`.
//!
//! At admission the host appends to the module two functions that make those
//! calls, in that order with the same arguments, and a mutable global that each
//! sets to the callback it is about to call; the host reads it only when a call
//! fails, to name the callback. Nothing of the guest's changes: its types,
//! functions, globals and exports keep their indices (the additions come after
//! them), and it imports nothing new. A module that does not lend itself (a
//! callback with another signature, GC types, a name already taken) runs as it
//! came, with one call per callback.

use std::collections::HashMap;
use std::ops::Range;

use sluice_abi::exports as ex;
use wasm_encoder::{ConstExpr, Encode, ExportKind, Function, GlobalType, ValType};
use wasmparser::{Encoding, ExternalKind, FuncType, Parser, Payload, TypeRef};

use crate::state::Callback;

/// `(ctx, root, headers, end_of_stream) -> action`: `proxy_on_context_create`
/// then `proxy_on_request_headers`.
pub(crate) const START: &str = "sluice:on_request_start";
/// `(ctx)`: `proxy_on_log`, `proxy_on_done` (its result dropped), `proxy_on_delete`,
/// those of them the module exports.
pub(crate) const END: &str = "sluice:on_request_end";
/// The global the fused functions set to the callback they are in.
pub(crate) const PHASE: &str = "sluice:phase";

/// The callbacks the fused functions call, as stored in [`PHASE`].
const PHASES: [Callback; 5] =
    [Callback::ContextCreate, Callback::RequestHeaders, Callback::Log, Callback::Done, Callback::Delete];

/// The callback a fused call was in, from the value of its [`PHASE`] global.
pub(crate) fn phase_callback(value: i32) -> Option<Callback> {
    usize::try_from(value).ok().and_then(|i| i.checked_sub(1)).and_then(|i| PHASES.get(i)).copied()
}

fn phase_of(callback: Callback) -> i32 {
    PHASES.iter().position(|c| *c == callback).map_or(0, |i| i as i32 + 1)
}

const TYPE: u8 = 1;
const FUNCTION: u8 = 3;
const GLOBAL: u8 = 6;
const EXPORT: u8 = 7;
const CODE: u8 = 10;

/// What the rewrite needs to know of a module.
#[derive(Default)]
struct Layout<'a> {
    /// Every section but the code section's entries, in order: id and contents.
    sections: Vec<(u8, Range<usize>)>,
    types: Vec<FuncType>,
    /// The type of each function, imported ones first.
    funcs: Vec<u32>,
    globals: u32,
    exports: HashMap<&'a str, (ExternalKind, u32)>,
}

impl<'a> Layout<'a> {
    fn read(bytes: &'a [u8]) -> wasmparser::Result<Option<Layout<'a>>> {
        let mut l = Layout::default();
        for payload in Parser::new(0).parse_all(bytes) {
            let payload = payload?;
            if let Some(section) = payload.as_section() {
                l.sections.push(section);
            }
            match payload {
                Payload::Version { encoding: Encoding::Component, .. } => return Ok(None),
                Payload::TypeSection(r) => {
                    for ty in r.into_iter_err_on_gc_types() {
                        l.types.push(ty?);
                    }
                }
                Payload::ImportSection(r) => {
                    for import in r.into_imports() {
                        match import?.ty {
                            TypeRef::Func(t) => l.funcs.push(t),
                            TypeRef::Global(_) => l.globals += 1,
                            _ => {}
                        }
                    }
                }
                Payload::FunctionSection(r) => {
                    for t in r {
                        l.funcs.push(t?);
                    }
                }
                Payload::GlobalSection(r) => l.globals += r.count(),
                Payload::ExportSection(r) => {
                    for e in r {
                        let e = e?;
                        l.exports.insert(e.name, (e.kind, e.index));
                    }
                }
                _ => {}
            }
        }
        Ok(Some(l))
    }

    /// The exported function `name` if its signature is `params -> results` (i32s).
    fn callback(&self, name: &str, params: usize, results: usize) -> Option<u32> {
        let (ExternalKind::Func, index) = *self.exports.get(name)? else { return None };
        let ty = self.types.get(*self.funcs.get(index as usize)? as usize)?;
        let all_i32 = |t: &[wasmparser::ValType]| t.iter().all(|v| *v == wasmparser::ValType::I32);
        let fits = ty.params().len() == params
            && ty.results().len() == results
            && all_i32(ty.params())
            && all_i32(ty.results());
        fits.then_some(index)
    }
}

const NO_LOCALS: [(u32, ValType); 0] = [];

/// A function the rewrite adds: its signature, body and export name.
struct Added {
    params: u32,
    results: u32,
    body: Function,
    name: &'static str,
}

/// The module with the fused entry points added, or `None` when it has nothing
/// to fuse or does not lend itself (it then runs as it came).
pub(crate) fn add_entry_points(bytes: &[u8]) -> Option<Vec<u8>> {
    let layout = Layout::read(bytes).ok()??;
    if [START, END, PHASE].iter().any(|n| layout.exports.contains_key(n)) {
        return None;
    }
    // The additions go at the end of these sections (a module whose callbacks
    // are all imports has no function or code section to extend).
    let has = |id: u8| layout.sections.iter().any(|(s, _)| *s == id);
    if !(has(TYPE) && has(FUNCTION) && has(EXPORT) && has(CODE)) {
        return None;
    }
    let phase = layout.globals;
    let set_phase = |f: &mut Function, callback: Callback| {
        f.instructions().i32_const(phase_of(callback)).global_set(phase);
    };
    let mut added = Vec::new();
    let create = layout.callback(ex::ON_CONTEXT_CREATE, 2, 0);
    // ABI 0.1.0's `proxy_on_request_headers` has no end-of-stream argument.
    let headers = layout
        .callback(ex::ON_REQUEST_HEADERS, 3, 1)
        .map(|f| (f, true))
        .or_else(|| layout.callback(ex::ON_REQUEST_HEADERS, 2, 1).map(|f| (f, false)));
    if let (Some(create), Some((headers, eos))) = (create, headers) {
        let mut body = Function::new(NO_LOCALS);
        set_phase(&mut body, Callback::ContextCreate);
        body.instructions().local_get(0).local_get(1).call(create);
        set_phase(&mut body, Callback::RequestHeaders);
        body.instructions().local_get(0).local_get(2);
        if eos {
            body.instructions().local_get(3);
        }
        body.instructions().call(headers).end();
        added.push(Added { params: 4, results: 1, body, name: START });
    }
    let end: Vec<(Callback, u32, bool)> = [
        (Callback::Log, layout.callback(ex::ON_LOG, 1, 0), false),
        (Callback::Done, layout.callback(ex::ON_DONE, 1, 1), true),
        (Callback::Delete, layout.callback(ex::ON_DELETE, 1, 0), false),
    ]
    .into_iter()
    .filter_map(|(cb, f, drop)| f.map(|f| (cb, f, drop)))
    .collect();
    // One callback alone gains nothing from a fused call.
    if end.len() > 1 {
        let mut body = Function::new(NO_LOCALS);
        for (callback, f, drop) in end {
            set_phase(&mut body, callback);
            body.instructions().local_get(0).call(f);
            if drop {
                body.instructions().drop();
            }
        }
        body.instructions().end();
        added.push(Added { params: 1, results: 0, body, name: END });
    }
    if added.is_empty() {
        return None;
    }
    Some(layout.emit(bytes, &added))
}

impl Layout<'_> {
    /// The module's bytes with `added`'s types, functions, code and exports and
    /// the phase global appended to their sections.
    fn emit(&self, bytes: &[u8], added: &[Added]) -> Vec<u8> {
        let first_type = self.types.len() as u32;
        let first_func = self.funcs.len() as u32;
        let mut out = Vec::with_capacity(bytes.len() + 256);
        out.extend_from_slice(&bytes[..8]);
        let has_global = self.sections.iter().any(|(id, _)| *id == GLOBAL);
        for (id, range) in &self.sections {
            let old = &bytes[range.clone()];
            let mut extra = Vec::new();
            let count = match *id {
                TYPE => {
                    for a in added {
                        extra.push(0x60);
                        for n in [a.params, a.results] {
                            n.encode(&mut extra);
                            (0..n).for_each(|_| ValType::I32.encode(&mut extra));
                        }
                    }
                    added.len()
                }
                FUNCTION => {
                    (0..added.len() as u32).for_each(|i| (first_type + i).encode(&mut extra));
                    added.len()
                }
                GLOBAL => {
                    phase_global(&mut extra);
                    1
                }
                EXPORT => {
                    if !has_global {
                        // The phase global goes in a section of its own, right before the exports.
                        let mut global = Vec::new();
                        phase_global(&mut global);
                        section(&mut out, GLOBAL, &[], 1, &global);
                    }
                    for (i, a) in added.iter().enumerate() {
                        a.name.encode(&mut extra);
                        ExportKind::Func.encode(&mut extra);
                        (first_func + i as u32).encode(&mut extra);
                    }
                    PHASE.encode(&mut extra);
                    ExportKind::Global.encode(&mut extra);
                    self.globals.encode(&mut extra);
                    added.len() + 1
                }
                CODE => {
                    added.iter().for_each(|a| a.body.encode(&mut extra));
                    added.len()
                }
                _ => {
                    section(&mut out, *id, old, 0, &[]);
                    continue;
                }
            };
            section(&mut out, *id, old, count as u32, &extra);
        }
        out
    }
}

fn phase_global(out: &mut Vec<u8>) {
    GlobalType { val_type: ValType::I32, mutable: true, shared: false }.encode(out);
    ConstExpr::i32_const(0).encode(out);
}

/// Writes a section: `old`'s contents, or with `extra` items appended to its
/// vector when `added` > 0 (the count is rewritten).
fn section(out: &mut Vec<u8>, id: u8, old: &[u8], added: u32, extra: &[u8]) {
    let mut contents = Vec::new();
    let body: &[u8] = if added == 0 && extra.is_empty() {
        old
    } else {
        let mut reader = wasmparser::BinaryReader::new(old, 0);
        let count = if old.is_empty() { 0 } else { reader.read_var_u32().unwrap_or(0) };
        (count + added).encode(&mut contents);
        contents.extend_from_slice(&old[reader.current_position()..]);
        contents.extend_from_slice(extra);
        &contents
    };
    out.push(id);
    body.len().encode(out);
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use wasmtime::{Engine, Instance, Module, Store, Val};

    use super::*;

    /// Callbacks that record their order (a decimal digit each) and arguments.
    const GUEST: &str = r#"(module
      (global $trace (export "trace") (mut i64) (i64.const 0))
      (global $args (export "args") (mut i32) (i32.const 0))
      (func $step (param i64) (global.set $trace (i64.add (i64.mul (global.get $trace) (i64.const 10)) (local.get 0))))
      (func (export "proxy_on_context_create") (param i32 i32)
        (call $step (i64.const 1))
        (global.set $args (i32.add (i32.mul (local.get 0) (i32.const 100)) (local.get 1))))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (call $step (i64.const 2))
        (i32.add (i32.mul (local.get 1) (i32.const 10)) (local.get 2)))
      (func (export "proxy_on_log") (param i32) (call $step (i64.const 3)))
      (func (export "proxy_on_done") (param i32) (result i32) (call $step (i64.const 4)) (i32.const 1))
      (func (export "proxy_on_delete") (param i32)
        (call $step (i64.const 5))
        (if (i32.eq (local.get 0) (i32.const 99)) (then unreachable))))"#;

    fn instance(wat: &str) -> (Store<()>, Instance) {
        let Ok(bytes) = wat::parse_str(wat) else { panic!("bad test module") };
        let Some(fused) = add_entry_points(&bytes) else { panic!("nothing fused") };
        let engine = Engine::default();
        let module = match Module::new(&engine, &fused) {
            Ok(m) => m,
            Err(e) => panic!("the fused module is invalid: {e:#}"),
        };
        let mut store = Store::new(&engine, ());
        match Instance::new(&mut store, &module, &[]) {
            Ok(i) => (store, i),
            Err(e) => panic!("cannot instantiate: {e:#}"),
        }
    }

    fn global(store: &mut Store<()>, instance: &Instance, name: &str) -> Val {
        match instance.get_global(&mut *store, name) {
            Some(g) => g.get(&mut *store),
            None => panic!("no global {name}"),
        }
    }

    #[test]
    fn start_creates_the_context_then_runs_request_headers_with_the_same_arguments() {
        let (mut store, instance) = instance(GUEST);
        let Ok(start) = instance.get_typed_func::<(i32, i32, i32, i32), i32>(&mut store, START) else {
            panic!("no start export")
        };
        let action = start.call(&mut store, (7, 1, 3, 1));
        assert!(matches!(action, Ok(31)), "{action:?}");
        assert!(matches!(global(&mut store, &instance, "trace"), Val::I64(12)));
        assert!(matches!(global(&mut store, &instance, "args"), Val::I32(701)));
        assert!(matches!(global(&mut store, &instance, PHASE), Val::I32(2)));
    }

    #[test]
    fn end_runs_log_done_delete_in_order_and_a_trap_names_its_callback() {
        let (mut store, instance) = instance(GUEST);
        let Ok(end) = instance.get_typed_func::<i32, ()>(&mut store, END) else { panic!("no end export") };
        assert!(end.call(&mut store, 7).is_ok());
        assert!(matches!(global(&mut store, &instance, "trace"), Val::I64(345)));
        assert!(end.call(&mut store, 99).is_err());
        let Val::I32(phase) = global(&mut store, &instance, PHASE) else { panic!("phase is not an i32") };
        assert_eq!(phase_callback(phase), Some(Callback::Delete));
        assert_eq!(phase_callback(0), None);
    }

    #[test]
    fn abi_0_1_0_request_headers_get_no_end_of_stream() {
        let (mut store, instance) = instance(
            r#"(module
              (func (export "proxy_on_context_create") (param i32 i32))
              (func (export "proxy_on_request_headers") (param i32 i32) (result i32) (local.get 1)))"#,
        );
        let Ok(start) = instance.get_typed_func::<(i32, i32, i32, i32), i32>(&mut store, START) else {
            panic!("no start export")
        };
        assert!(matches!(start.call(&mut store, (2, 1, 5, 1)), Ok(5)));
        assert!(instance.get_export(&mut store, END).is_none(), "nothing to fuse at the end");
        // The module had no globals: the phase global got a section of its own.
        assert!(matches!(global(&mut store, &instance, PHASE), Val::I32(2)));
    }

    #[test]
    fn modules_that_do_not_lend_themselves_run_as_they_came() {
        let fuse = |wat: &str| match wat::parse_str(wat) {
            Ok(bytes) => add_entry_points(&bytes),
            Err(e) => panic!("bad test module: {e}"),
        };
        // Another signature for `proxy_on_request_headers`, and a single end callback.
        assert!(
            fuse(
                r#"(module
                  (func (export "proxy_on_context_create") (param i32 i32))
                  (func (export "proxy_on_request_headers") (param i32 i64 i32) (result i32) (i32.const 0))
                  (func (export "proxy_on_log") (param i32)))"#
            )
            .is_none()
        );
        // A name of ours already taken.
        assert!(
            fuse(
                r#"(module
                  (func (export "proxy_on_context_create") (param i32 i32))
                  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
                  (func (export "sluice:phase")))"#
            )
            .is_none()
        );
        assert!(add_entry_points(b"\0asm\x01\0\0\0\x01").is_none(), "a truncated module");
        // Callbacks that are imports, exported again: no code section to extend.
        assert!(
            fuse(
                r#"(module
                  (import "env" "c" (func $c (param i32 i32)))
                  (import "env" "h" (func $h (param i32 i32 i32) (result i32)))
                  (export "proxy_on_context_create" (func $c))
                  (export "proxy_on_request_headers" (func $h)))"#
            )
            .is_none()
        );
    }

    #[test]
    fn imported_functions_and_globals_keep_their_indices() {
        // An import shifts both index spaces; the fused code must call past it.
        let wat = r#"(module
          (import "env" "g" (global $g i32))
          (import "env" "f" (func $f (param i32)))
          (global $trace (export "trace") (mut i32) (i32.const 0))
          (func (export "proxy_on_context_create") (param i32 i32) (global.set $trace (local.get 1)))
          (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (global.get $g))
          (func (export "proxy_on_done") (param i32) (result i32) (i32.const 0))
          (func (export "proxy_on_delete") (param i32) (global.set $trace (i32.const 9))))"#;
        let Ok(bytes) = wat::parse_str(wat) else { panic!("bad test module") };
        let Some(fused) = add_entry_points(&bytes) else { panic!("nothing fused") };
        let engine = Engine::default();
        let Ok(module) = Module::new(&engine, &fused) else { panic!("invalid fused module") };
        let mut store = Store::new(&engine, ());
        let Ok(g) = wasmtime::Global::new(
            &mut store,
            wasmtime::GlobalType::new(wasmtime::ValType::I32, wasmtime::Mutability::Const),
            Val::I32(42),
        ) else {
            panic!("global")
        };
        let f = wasmtime::Func::wrap(&mut store, |_: i32| {});
        let Ok(instance) = Instance::new(&mut store, &module, &[g.into(), f.into()]) else {
            panic!("cannot instantiate")
        };
        let Ok(start) = instance.get_typed_func::<(i32, i32, i32, i32), i32>(&mut store, START) else {
            panic!("no start export")
        };
        assert!(matches!(start.call(&mut store, (2, 1, 0, 1)), Ok(42)));
        assert!(matches!(global(&mut store, &instance, "trace"), Val::I32(1)));
        let Ok(end) = instance.get_typed_func::<i32, ()>(&mut store, END) else { panic!("no end export") };
        assert!(end.call(&mut store, 2).is_ok());
        assert!(matches!(global(&mut store, &instance, "trace"), Val::I32(9)));
        assert!(matches!(global(&mut store, &instance, PHASE), Val::I32(5)));
    }
}
