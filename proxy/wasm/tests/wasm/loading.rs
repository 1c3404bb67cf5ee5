//! Loading: files, the module store with digest checks, the disk cache.

use std::path::Path;
use std::sync::Arc;

use sluice_filter::{FilterLoader, LoadContext};
use sluice_wasm::{HostOptions, ModuleStore, WasmHost};

use crate::common::{TestCallouts, fixture, metric, spec};

struct Store(Vec<u8>);

impl ModuleStore for Store {
    fn get(&self, _sha256_hex: &str) -> Option<Vec<u8>> {
        Some(self.0.clone())
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn host(options: HostOptions) -> (WasmHost, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let host = WasmHost::new(
        HostOptions { max_instances: 16, ..options },
        &registry,
        Arc::new(TestCallouts::default()),
    )
    .expect("host");
    (host, registry)
}

#[test]
fn loads_files_relative_to_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("mini.wasm"), fixture("mini")).expect("write");
    let (host, registry) = host(HostOptions::default());
    let mut s = spec("mini");
    s.module = "mini.wasm".into();
    let cx = LoadContext { base_dir: dir.path(), clusters: &[], node: &Default::default() };
    let factory = host.load(&s, &cx).expect("load");
    assert_eq!(factory.name(), "mini");
    assert_eq!(factory.status()["digest"], sha256_hex(&fixture("mini")));
    assert_eq!(metric(&registry, "sluice_wasm_loads_total", r#"plugin="mini""#), Some(1.0));
    s.module = "missing.wasm".into();
    let err = host.load(&s, &cx).expect_err("missing file");
    assert!(err.reason.contains("missing.wasm"), "{}", err.reason);
}

#[test]
fn module_store_references_are_digest_checked() {
    let bytes = fixture("mini");
    let digest = sha256_hex(&bytes);
    let (host, _) =
        host(HostOptions { module_store: Some(Arc::new(Store(bytes.clone()))), ..HostOptions::default() });
    let cx = LoadContext { base_dir: Path::new("/"), clusters: &[], node: &Default::default() };
    let mut s = spec("stored");
    s.module = format!("sha256:{digest}");
    host.load(&s, &cx).expect("stored module");
    // The store answers with other bytes than the digest names.
    s.module = format!("sha256:{}", "0".repeat(64));
    let err = host.load(&s, &cx).expect_err("digest mismatch");
    assert!(err.reason.contains("expected 0000"), "{}", err.reason);
    let (no_store, _) = host_without_store();
    s.module = format!("sha256:{digest}");
    assert!(no_store.load(&s, &cx).expect_err("no store").reason.contains("module store"));
}

fn host_without_store() -> (WasmHost, prometheus::Registry) {
    host(HostOptions::default())
}

#[test]
fn compiled_modules_are_cached_in_memory_and_on_disk() {
    let cache = tempfile::tempdir().expect("tempdir");
    let options = || HostOptions { cache_dir: Some(cache.path().to_path_buf()), ..HostOptions::default() };
    let bytes = fixture("sink");
    {
        let (host, registry) = host(options());
        let a = host.load_bytes(&spec("a"), &bytes, &[]).expect("load");
        host.load_bytes(&spec("b"), &bytes, &[]).expect("load");
        assert_eq!(metric(&registry, "sluice_wasm_module_cache_total", r#"result="compiled""#), Some(1.0));
        assert_eq!(metric(&registry, "sluice_wasm_module_cache_total", r#"result="memory""#), Some(1.0));
        drop(a);
    }
    // A restarted process loads the artifact instead of compiling.
    let (host, registry) = host(options());
    host.load_bytes(&spec("a"), &bytes, &[]).expect("load");
    assert_eq!(metric(&registry, "sluice_wasm_module_cache_total", r#"result="disk""#), Some(1.0));
}
