//! `sluice filter new` and `sluice filter build` end to end: the real binary
//! scaffolds a crate into a temp folder, the scaffold's own `cargo test` passes, and
//! the build reports a real wasm module with the proxy-wasm ABI marker.
//!
//! Nested cargo runs use `target/wasm-fixtures` as their target folder: shared
//! compiled dependencies between runs, and no wait on the outer build's lock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sluice(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).current_dir(cwd).output().expect("run sluice")
}

fn fixtures_target() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("wasm-fixtures")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn scaffold_tests_and_builds_to_a_proxy_wasm_module() {
    let tmp = tempfile::tempdir().unwrap();
    let out = sluice(&["filter", "new", "demo-filter", "--dir", tmp.path().to_str().unwrap()], tmp.path());
    assert!(out.status.success(), "{}", text(&out));
    let crate_dir = tmp.path().join("demo-filter");
    for f in ["Cargo.toml", "src/lib.rs", "tests/filter.rs", "README.md", "Cargo.lock"] {
        assert!(crate_dir.join(f).is_file(), "missing {f}");
    }
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    assert!(manifest.contains(r#"crate-type = ["cdylib", "rlib"]"#));
    assert!(manifest.contains("[workspace]"));
    assert!(manifest.contains(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk").canonicalize().unwrap().display().to_string()
    ));

    // The scaffold's own tests, natively, with the SDK's test kit.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let test = Command::new(&cargo)
        .args(["test", "--offline", "--target-dir"])
        .arg(fixtures_target())
        .current_dir(&crate_dir)
        .output()
        .unwrap();
    assert!(test.status.success(), "{}", text(&test));
    assert!(String::from_utf8_lossy(&test.stdout).contains("test result: ok. 3 passed"), "{}", text(&test));

    // The build reports the module's path, size and ABI marker.
    let fixtures = fixtures_target();
    let build = sluice(
        &[
            "filter",
            "build",
            "--release",
            "--path",
            crate_dir.to_str().unwrap(),
            "--target-dir",
            fixtures.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(build.status.success(), "{}", text(&build));
    let stdout = String::from_utf8_lossy(&build.stdout);
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
    };
    let module = PathBuf::from(field("module:"));
    assert!(module.ends_with("wasm32-wasip1/release/demo_filter.wasm"), "{}", module.display());
    let size: u64 = field("size:").split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(size, std::fs::metadata(&module).unwrap().len());
    assert!(size < 1024 * 1024, "the size-optimised profile keeps modules small: {size} bytes");
    assert_eq!(field("abi:"), "proxy_abi_version_0_2_1");
    assert!(field("callbacks:").starts_with("2"), "{stdout}");
    let wasm = std::fs::read(&module).unwrap();
    assert_eq!(&wasm[..4], b"\0asm");
}

#[test]
fn bad_names_existing_folders_and_missing_crates_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let out = sluice(&["filter", "new", "Bad_Name", "--dir", dir], tmp.path());
    assert!(!out.status.success());
    assert!(text(&out).contains("invalid filter name"), "{}", text(&out));

    std::fs::create_dir(tmp.path().join("taken")).unwrap();
    let out = sluice(&["filter", "new", "taken", "--dir", dir], tmp.path());
    assert!(!out.status.success());
    assert!(text(&out).contains("already exists"), "{}", text(&out));

    let out = sluice(&["filter", "new", "x", "--dir", dir, "--sdk-path", "/nonexistent/sdk"], tmp.path());
    assert!(!out.status.success());
    assert!(text(&out).contains("/nonexistent/sdk"), "{}", text(&out));

    let out = sluice(&["filter", "build", "--path", dir], tmp.path());
    assert!(!out.status.success());
    assert!(text(&out).contains("has no Cargo.toml"), "{}", text(&out));
}
