//! Module admission and compilation: ABI version detection, import allowlist,
//! export signatures, `InstancePre`.

use std::fmt;

use sha2::{Digest, Sha256};
use sluice_abi::{exports as ex, version};
use wasmtime::{Engine, ExternType, FuncType, InstancePre, Linker, Module, ModuleExport, ValType};

use crate::hostcalls::{ENV_IMPORTS, WASI_IMPORTS, WASI_MODULES};
use crate::state::VmState;

/// The proxy-wasm ABI version a module was built for, from its marker export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiVersion {
    /// `proxy_abi_version_0_1_0` (`proxy-wasm` crate 0.1.x).
    V0_1_0,
    /// `proxy_abi_version_0_2_0`.
    V0_2_0,
    /// `proxy_abi_version_0_2_1` (`proxy-wasm` crate 0.2.x and later).
    V0_2_1,
}

impl AbiVersion {
    /// The version as `0.2.1`.
    pub fn as_str(self) -> &'static str {
        match self {
            AbiVersion::V0_1_0 => "0.1.0",
            AbiVersion::V0_2_0 => "0.2.0",
            AbiVersion::V0_2_1 => "0.2.1",
        }
    }
}

impl fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A module compiled once per digest, with its imports resolved.
pub(crate) struct CompiledModule {
    pub digest: String,
    pub abi: AbiVersion,
    pub pre: InstancePre<VmState>,
    /// Where the exports a VM uses are, so that a VM resolves none by name.
    pub exports: ExportIndices,
}

/// The exports a VM uses, located once per module (their signatures were checked
/// at admission). Optional callbacks the module does not export are `None`.
pub(crate) struct ExportIndices {
    pub memory: ModuleExport,
    /// `proxy_on_memory_allocate`, else `malloc`.
    pub allocator: ModuleExport,
    /// `_initialize`, else `_start` (`true`: a command module's).
    pub init: Option<(ModuleExport, bool)>,
    /// After `_initialize` only: `main` (`true`: called with (0, 0)), else
    /// `__main_void`, as Envoy's C++ host calls them.
    pub main: Option<(ModuleExport, bool)>,
    pub on_context_create: ModuleExport,
    pub on_vm_start: Option<ModuleExport>,
    pub on_configure: Option<ModuleExport>,
    pub on_tick: Option<ModuleExport>,
    pub on_queue_ready: Option<ModuleExport>,
    pub on_done: Option<ModuleExport>,
    pub on_log: Option<ModuleExport>,
    pub on_delete: Option<ModuleExport>,
    pub on_request_headers: Option<ModuleExport>,
    pub on_request_body: Option<ModuleExport>,
    pub on_request_trailers: Option<ModuleExport>,
    pub on_response_headers: Option<ModuleExport>,
    pub on_response_body: Option<ModuleExport>,
    pub on_response_trailers: Option<ModuleExport>,
    pub on_http_call_response: Option<ModuleExport>,
    pub on_grpc_receive: Option<ModuleExport>,
    pub on_grpc_close: Option<ModuleExport>,
    /// The fused entry points the host added (see [`crate::fuse`]), and their phase global.
    pub fused_start: Option<ModuleExport>,
    pub fused_end: Option<ModuleExport>,
    pub fused_phase: Option<ModuleExport>,
}

impl ExportIndices {
    /// Locates the exports of an admitted module ([`check_exports`] passed).
    fn locate(module: &Module) -> Result<ExportIndices, String> {
        let at = |name: &str| module.get_export_index(name);
        let required = |name: &str| at(name).ok_or_else(|| format!("missing export `{name}`"));
        let init = at(ex::INITIALIZE).map(|e| (e, false)).or_else(|| at(ex::START).map(|e| (e, true)));
        let main = match init {
            Some((_, false)) => {
                at(ex::MAIN).map(|e| (e, true)).or_else(|| at(ex::MAIN_VOID).map(|e| (e, false)))
            }
            _ => None,
        };
        Ok(ExportIndices {
            memory: required("memory")?,
            allocator: at(ex::ON_MEMORY_ALLOCATE).map_or_else(|| required(ex::MALLOC), Ok)?,
            init,
            main,
            on_context_create: required(ex::ON_CONTEXT_CREATE)?,
            on_vm_start: at(ex::ON_VM_START),
            on_configure: at(ex::ON_CONFIGURE),
            on_tick: at(ex::ON_TICK),
            on_queue_ready: at(ex::ON_QUEUE_READY),
            on_done: at(ex::ON_DONE),
            on_log: at(ex::ON_LOG),
            on_delete: at(ex::ON_DELETE),
            on_request_headers: at(ex::ON_REQUEST_HEADERS),
            on_request_body: at(ex::ON_REQUEST_BODY),
            on_request_trailers: at(ex::ON_REQUEST_TRAILERS),
            on_response_headers: at(ex::ON_RESPONSE_HEADERS),
            on_response_body: at(ex::ON_RESPONSE_BODY),
            on_response_trailers: at(ex::ON_RESPONSE_TRAILERS),
            on_http_call_response: at(ex::ON_HTTP_CALL_RESPONSE),
            on_grpc_receive: at(ex::ON_GRPC_RECEIVE),
            on_grpc_close: at(ex::ON_GRPC_CLOSE),
            fused_start: at(crate::fuse::START),
            fused_end: at(crate::fuse::END),
            fused_phase: at(crate::fuse::PHASE),
        })
    }
}

/// The lowercase hex sha256 of some bytes.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl CompiledModule {
    /// Admits and compiles a module. Errors name the problem.
    pub fn compile(
        engine: &Engine,
        linker: &Linker<VmState>,
        digest: &str,
        bytes: &[u8],
    ) -> Result<CompiledModule, String> {
        if !bytes.starts_with(b"\0asm") {
            return Err(
                "not a WebAssembly binary module (text and precompiled artifacts are not accepted)".into()
            );
        }
        let module = compile_fused(engine, bytes)?;
        let abi = detect_abi(&module)?;
        check_imports(&module)?;
        check_exports(&module, abi)?;
        let exports = ExportIndices::locate(&module)?;
        let pre = linker.instantiate_pre(&module).map_err(|e| format!("cannot link module: {e:#}"))?;
        Ok(CompiledModule { digest: digest.to_string(), abi, pre, exports })
    }
}

/// Compiles the module with the host's fused entry points added when it lends
/// itself to them, else as it came. Errors are about the module as it came.
fn compile_fused(engine: &Engine, bytes: &[u8]) -> Result<Module, String> {
    let invalid = |e: wasmtime::Error| format!("invalid module: {e:#}");
    let Some(fused) = crate::fuse::add_entry_points(bytes) else {
        return Module::from_binary(engine, bytes).map_err(invalid);
    };
    match Module::from_binary(engine, &fused) {
        Ok(module) => Ok(module),
        Err(fused_err) => {
            let module = Module::from_binary(engine, bytes).map_err(invalid)?;
            tracing::warn!(error = %format!("{fused_err:#}"), "fused entry points not added; the module runs as it came");
            Ok(module)
        }
    }
}

fn detect_abi(module: &Module) -> Result<AbiVersion, String> {
    let has = |name: &str| matches!(module.get_export(name), Some(ExternType::Func(_)));
    if has(version::V0_2_1) {
        Ok(AbiVersion::V0_2_1)
    } else if has(version::V0_2_0) {
        Ok(AbiVersion::V0_2_0)
    } else if has(version::V0_1_0) {
        Ok(AbiVersion::V0_1_0)
    } else {
        let other: Vec<&str> =
            module.exports().map(|e| e.name()).filter(|n| n.starts_with("proxy_abi_version_")).collect();
        if other.is_empty() {
            Err("no proxy-wasm ABI version marker export (expected `proxy_abi_version_0_2_1`, `_0_2_0` or `_0_1_0`)".into())
        } else {
            Err(format!(
                "unsupported proxy-wasm ABI version marker `{}` (supported: 0.2.1, 0.2.0, 0.1.0)",
                other.join("`, `")
            ))
        }
    }
}

fn check_imports(module: &Module) -> Result<(), String> {
    for import in module.imports() {
        let (m, n) = (import.module(), import.name());
        if !matches!(import.ty(), ExternType::Func(_)) {
            return Err(format!("disallowed import `{m}::{n}`: only function imports are allowed"));
        }
        let allowed = if m == "env" {
            // Test builds admit the test hook's import too.
            ENV_IMPORTS.contains(&n) || (cfg!(test) && n == crate::hostcalls::TEST_PANIC)
        } else if WASI_MODULES.contains(&m) {
            if !WASI_IMPORTS.contains(&n) {
                return Err(format!(
                    "disallowed import `{m}::{n}`: only a WASI subset without filesystem or sockets is provided"
                ));
            }
            true
        } else {
            false
        };
        if !allowed {
            return Err(format!("disallowed import `{m}::{n}`: not a proxy-wasm or WASI host function"));
        }
    }
    Ok(())
}

/// `i` = i32, `I` = i64.
type Sig = (&'static str, &'static str, &'static str);

const EXPORTS_V2: &[Sig] = &[
    (ex::ON_CONTEXT_CREATE, "ii", ""),
    (ex::ON_VM_START, "ii", "i"),
    (ex::ON_CONFIGURE, "ii", "i"),
    (ex::ON_TICK, "i", ""),
    (ex::ON_QUEUE_READY, "ii", ""),
    (ex::ON_DONE, "i", "i"),
    (ex::ON_LOG, "i", ""),
    (ex::ON_DELETE, "i", ""),
    (ex::ON_REQUEST_HEADERS, "iii", "i"),
    (ex::ON_REQUEST_BODY, "iii", "i"),
    (ex::ON_REQUEST_TRAILERS, "ii", "i"),
    (ex::ON_RESPONSE_HEADERS, "iii", "i"),
    (ex::ON_RESPONSE_BODY, "iii", "i"),
    (ex::ON_RESPONSE_TRAILERS, "ii", "i"),
    (ex::ON_HTTP_CALL_RESPONSE, "iiiii", ""),
    (ex::ON_GRPC_RECEIVE, "iii", ""),
    (ex::ON_GRPC_CLOSE, "iii", ""),
    (ex::ON_MEMORY_ALLOCATE, "i", "i"),
    (ex::MALLOC, "i", "i"),
    (ex::INITIALIZE, "", ""),
    (ex::START, "", ""),
];

fn expected(name: &str, abi: AbiVersion) -> Option<(&'static str, &'static str)> {
    if abi == AbiVersion::V0_1_0 && (name == ex::ON_REQUEST_HEADERS || name == ex::ON_RESPONSE_HEADERS) {
        return Some(("ii", "i"));
    }
    EXPORTS_V2.iter().find(|(n, _, _)| *n == name).map(|(_, p, r)| (*p, *r))
}

fn sig_matches(ty: &FuncType, params: &str, results: &str) -> bool {
    fn same(types: impl ExactSizeIterator<Item = ValType>, want: &str) -> bool {
        types.len() == want.len()
            && types.zip(want.chars()).all(|(t, c)| match c {
                'i' => matches!(t, ValType::I32),
                'I' => matches!(t, ValType::I64),
                _ => false,
            })
    }
    same(ty.params(), params) && same(ty.results(), results)
}

fn describe(ty: &FuncType) -> String {
    let list = |v: Vec<String>| v.join(", ");
    format!(
        "({}) -> ({})",
        list(ty.params().map(|t| t.to_string()).collect()),
        list(ty.results().map(|t| t.to_string()).collect())
    )
}

/// Checks the signatures of known exports and that the required ones exist.
fn check_exports(module: &Module, abi: AbiVersion) -> Result<(), String> {
    for export in module.exports() {
        let name = export.name();
        if let Some((params, results)) = expected(name, abi) {
            let ExternType::Func(ty) = export.ty() else {
                return Err(format!("export `{name}` is not a function"));
            };
            if !sig_matches(&ty, params, results) {
                return Err(format!(
                    "export `{name}` has signature {}, which does not match the proxy-wasm ABI",
                    describe(&ty)
                ));
            }
        }
    }
    if !matches!(module.get_export("memory"), Some(ExternType::Memory(_))) {
        return Err("missing export `memory`".into());
    }
    if module.get_export(ex::ON_CONTEXT_CREATE).is_none() {
        return Err(format!("missing export `{}`", ex::ON_CONTEXT_CREATE));
    }
    if module.get_export(ex::ON_MEMORY_ALLOCATE).is_some() || module.get_export(ex::MALLOC).is_some() {
        Ok(())
    } else {
        Err(format!("missing allocator export (`{}` or `{}`)", ex::ON_MEMORY_ALLOCATE, ex::MALLOC))
    }
}
