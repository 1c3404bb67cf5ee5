//! `sluice filter new` and `sluice filter build`: scaffold a proxy-wasm filter crate
//! on the Sluice SDK, and build it to `wasm32-wasip1`, reporting the module's path,
//! size and ABI version marker.
//!
//! The scaffold depends on `sluice-sdk` by path: `--sdk-path`, else
//! `SLUICE_SDK_PATH`, else the `sdk/` folder of the checkout this binary was built
//! from. When that checkout has a `Cargo.lock`, it is copied into the new crate so
//! the crate resolves to the same, already-downloaded versions (builds work offline).

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context as _, bail};
use clap::Subcommand;

/// The `sluice filter` subcommands.
#[derive(Subcommand)]
pub enum FilterCmd {
    /// Scaffold a filter crate (Cargo.toml, src/lib.rs, a test-kit test, README).
    New {
        /// Crate name: lowercase letters, digits and `-`, starting with a letter.
        name: String,
        /// Folder to create the crate in (default: the current folder).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Path of the `sluice-sdk` crate (default: this checkout's `sdk/`).
        #[arg(long, env = "SLUICE_SDK_PATH")]
        sdk_path: Option<PathBuf>,
    },
    /// Build a filter crate to wasm and report the module's path, size and ABI.
    Build {
        /// The crate's folder.
        #[arg(long, default_value = ".")]
        path: PathBuf,
        /// Optimised build (the scaffold's release profile is size-optimised).
        #[arg(long)]
        release: bool,
        /// Cargo target folder (default: the crate's `target/`).
        #[arg(long)]
        target_dir: Option<PathBuf>,
        /// The wasm target.
        #[arg(long, default_value = "wasm32-wasip1", value_parser = ["wasm32-wasip1", "wasm32-unknown-unknown"])]
        target: String,
    },
}

/// Runs a `sluice filter` subcommand.
pub fn run(cmd: FilterCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        FilterCmd::New { name, dir, sdk_path } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            let created = scaffold(&name, &dir, sdk_path)?;
            println!("created filter crate {name} in {}", created.display());
            println!("next: cd {} && cargo test && sluice filter build --release", created.display());
            Ok(ExitCode::SUCCESS)
        }
        FilterCmd::Build { path, release, target_dir, target } => {
            let built = build(&path, release, target_dir.as_deref(), &target)?;
            println!("module: {}", built.path.display());
            println!("size: {} bytes ({:.1} KiB)", built.size, built.size as f64 / 1024.0);
            println!("abi: {}", built.abi);
            println!("callbacks: {} proxy_on_* exports", built.callbacks);
            Ok(ExitCode::SUCCESS)
        }
    }
}

// === new ===

fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

/// The `sdk/` folder of the checkout this binary was built from, if it is there.
fn default_sdk_path() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk");
    p.join("Cargo.toml").is_file().then_some(p)
}

/// Writes the crate `dir/name`; returns its folder.
pub fn scaffold(name: &str, dir: &Path, sdk_path: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if !valid_name(name) {
        bail!("invalid filter name {name:?}: use lowercase letters, digits and `-`, starting with a letter");
    }
    let sdk = match sdk_path.or_else(default_sdk_path) {
        Some(p) => p,
        None => bail!("cannot find sluice-sdk: pass --sdk-path or set SLUICE_SDK_PATH to the SDK's folder"),
    };
    let sdk = sdk.canonicalize().with_context(|| format!("sluice-sdk path {}", sdk.display()))?;
    if !sdk.join("Cargo.toml").is_file() {
        bail!("{} has no Cargo.toml: not the sluice-sdk crate", sdk.display());
    }
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    fs::create_dir_all(root.join("src")).with_context(|| format!("cannot create {}", root.display()))?;
    fs::create_dir_all(root.join("tests"))?;
    let lib = name.replace('-', "_");
    let sdk_text = sdk.display().to_string().replace('\\', "/");
    let fill = |t: &str| t.replace("{name}", name).replace("{lib}", &lib).replace("{sdk}", &sdk_text);
    let files = [
        ("Cargo.toml", fill(CARGO_TOML)),
        ("src/lib.rs", fill(LIB_RS)),
        ("tests/filter.rs", fill(TEST_RS)),
        ("README.md", fill(README)),
        (".gitignore", "/target\n".to_string()),
    ];
    for (file, text) in files {
        let p = root.join(file);
        fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    // Same dependency versions as the SDK's checkout: already downloaded, so the
    // new crate builds offline.
    if let Some(lock) = sdk.parent().map(|p| p.join("Cargo.lock")).filter(|p| p.is_file()) {
        fs::copy(&lock, root.join("Cargo.lock"))
            .with_context(|| format!("cannot copy {}", lock.display()))?;
    }
    Ok(root)
}

// === build ===

/// A built module.
#[derive(Debug)]
pub struct Built {
    /// The `.wasm` file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The ABI version marker export (`proxy_abi_version_0_2_1`).
    pub abi: String,
    /// How many `proxy_on_*` callbacks it exports.
    pub callbacks: usize,
}

fn ensure_target(dir: &Path, target: &str) -> anyhow::Result<()> {
    let listed = Command::new("rustup").args(["target", "list", "--installed"]).current_dir(dir).output();
    let Ok(out) = listed else {
        eprintln!("warning: rustup not found; assuming target {target} is installed");
        return Ok(());
    };
    if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == target) {
        return Ok(());
    }
    eprintln!("installing the {target} target (rustup target add {target})");
    let status = Command::new("rustup")
        .args(["target", "add", target])
        .current_dir(dir)
        .status()
        .context("cannot run rustup target add")?;
    if !status.success() {
        bail!("rustup target add {target} failed");
    }
    Ok(())
}

/// Builds the crate at `dir` for `target` and inspects the module.
pub fn build(dir: &Path, release: bool, target_dir: Option<&Path>, target: &str) -> anyhow::Result<Built> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!("{} has no Cargo.toml", dir.display());
    }
    ensure_target(dir, target)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--lib", "--target", target, "--message-format", "json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(&manifest)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if release {
        cmd.arg("--release");
    }
    if let Some(t) = target_dir {
        cmd.arg("--target-dir").arg(t);
    }
    let mut child = cmd.spawn().context("cannot run cargo")?;
    let mut wasm = None;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("cannot read cargo's output")?;
            if let Some(p) = wasm_artifact(&line) {
                wasm = Some(p);
            }
        }
    }
    let status = child.wait().context("cargo did not finish")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    let Some(path) = wasm else {
        bail!("cargo built no .wasm: is the crate a cdylib (crate-type = [\"cdylib\", \"rlib\"])?");
    };
    let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let (abi, callbacks) = inspect(&bytes)?;
    Ok(Built { path, size: bytes.len() as u64, abi, callbacks })
}

/// The `.wasm` file of a `compiler-artifact` message, if this line is one.
fn wasm_artifact(line: &str) -> Option<PathBuf> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    msg.get("filenames")?
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str())
        .find(|f| f.ends_with(".wasm"))
        .map(PathBuf::from)
}

/// Finds the ABI version marker and counts the `proxy_on_*` exports.
pub fn inspect(bytes: &[u8]) -> anyhow::Result<(String, usize)> {
    let mut abi = Vec::new();
    let mut callbacks = 0;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        if let wasmparser::Payload::ExportSection(reader) = payload.context("not a valid wasm module")? {
            for export in reader {
                let export = export.context("malformed export section")?;
                if export.name.starts_with("proxy_abi_version_") {
                    abi.push(export.name.to_string());
                } else if export.name.starts_with("proxy_on_") {
                    callbacks += 1;
                }
            }
        }
    }
    match abi.as_slice() {
        [one] => Ok((one.clone(), callbacks)),
        [] => bail!("not a proxy-wasm module: no proxy_abi_version_* export"),
        many => {
            let mut list = String::new();
            for m in many {
                let _ = write!(list, " {m}");
            }
            bail!("several ABI version markers:{list}")
        }
    }
}

// === templates ===

const CARGO_TOML: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the .wasm module; rlib: so `cargo test` can link the filter natively.
crate-type = ["cdylib", "rlib"]

[dependencies]
sluice-sdk = { path = "{sdk}" }
serde = { version = "1", features = ["derive"] }

[dev-dependencies]
serde_json = "1"

# Small modules: optimise for size, one codegen unit, full LTO, no unwinding.
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true

# Its own workspace, so the crate builds standalone wherever it lives.
[workspace]
"#;

const LIB_RS: &str = r#"//! {name}: a Sluice (proxy-wasm ABI v0.2.1) filter.
//!
//! Blocks requests whose path starts with one of `blocked_prefixes` (403) and adds
//! `x-greeting: <greeting>` to every response. Replace with your own logic.

use std::rc::Rc;

use serde::Deserialize;
use sluice_sdk::metrics::Counter;
use sluice_sdk::{Action, Error, Http, HttpContext, Root, RootContext};

/// The plugin configuration (the `config:` of the filter entry, as JSON).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Value of the `x-greeting` response header.
    #[serde(default = "default_greeting")]
    pub greeting: String,
    /// Path prefixes answered with 403.
    #[serde(default)]
    pub blocked_prefixes: Vec<String>,
}

fn default_greeting() -> String {
    "hello".into()
}

/// The plugin: one per VM, holds the configuration.
#[derive(Default)]
pub struct Plugin {
    config: Option<Rc<Config>>,
    blocked: Option<Counter>,
}

impl RootContext for Plugin {
    type Config = Config;
    type Http = Request;

    fn on_configure(&mut self, _root: &mut Root, config: Config) -> Result<(), Error> {
        if config.greeting.is_empty() {
            return Err(Error::msg("greeting must not be empty"));
        }
        self.blocked = Some(Counter::new("{lib}_blocked")?);
        sluice_sdk::info!("{name} configured: {} blocked prefixes", config.blocked_prefixes.len());
        self.config = Some(Rc::new(config));
        Ok(())
    }

    fn new_http(&mut self, _root: &mut Root) -> Request {
        Request { config: self.config.clone(), blocked: self.blocked }
    }
}

/// One request.
pub struct Request {
    config: Option<Rc<Config>>,
    blocked: Option<Counter>,
}

impl HttpContext for Request {
    fn on_request_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        let Some(config) = &self.config else { return Ok(Action::Continue) };
        let path = http.request().path()?.unwrap_or_default();
        if config.blocked_prefixes.iter().any(|p| path.starts_with(p.as_str())) {
            if let Some(c) = self.blocked {
                c.inc()?;
            }
            http.respond(403, &[("content-type", "text/plain")], "blocked\n")?;
            return Ok(Action::Pause);
        }
        Ok(Action::Continue)
    }

    fn on_response_headers(&mut self, http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        if let Some(config) = &self.config {
            http.response().set_header("x-greeting", &config.greeting)?;
        }
        Ok(Action::Continue)
    }
}

sluice_sdk::filter!(Plugin);
"#;

const TEST_RS: &str = r#"//! Unit tests of the filter with the SDK's native test kit: no wasm, no proxy.

use serde_json::json;
use sluice_sdk::testing::{TestHost, TestResponse};
use {lib}::Plugin;

fn host() -> TestHost {
    TestHost::new::<Plugin>()
        .config(json!({"greeting": "hi", "blocked_prefixes": ["/admin"]}))
        .expect("the config is valid")
}

#[test]
fn allowed_requests_reach_the_upstream_and_get_the_greeting() {
    let host = host();
    let r = host.request().path("/hello").upstream(TestResponse::new(200).body("ok")).send();
    assert_eq!(r.upstream_request().path(), Some("/hello"));
    assert_eq!(r.response().header("x-greeting"), Some("hi"));
    assert_eq!(r.response().body_text(), "ok");
}

#[test]
fn blocked_prefixes_get_403() {
    let host = host();
    let r = host.request().path("/admin/users").send();
    assert_eq!(r.local_response().status, 403);
    assert!(r.try_upstream_request().is_none());
    assert_eq!(host.metric("{lib}_blocked"), Some(1));
}

#[test]
fn bad_config_is_rejected() {
    let err = TestHost::new::<Plugin>().config(json!({"greeting": ""})).unwrap_err();
    assert!(err.to_string().contains("greeting must not be empty"), "{err}");
}
"#;

const README: &str = r#"# {name}

A Sluice filter (proxy-wasm ABI v0.2.1), made with `sluice filter new`.

```sh
cargo test                                   # unit tests with the SDK's test kit
sluice filter build --release                # -> target/wasm32-wasip1/release/{lib}.wasm
```

Use it in a Sluice config:

```yaml
filters:
  - name: {name}
    module: target/wasm32-wasip1/release/{lib}.wasm   # relative to the config file
    config:
      greeting: hi
      blocked_prefixes: [/admin]
```

See `docs/filter-authoring.md` in the Sluice repository for the whole tutorial.
"#;

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("my-filter2"));
        assert!(!valid_name("My"));
        assert!(!valid_name("2x"));
        assert!(!valid_name("a_b"));
        assert!(!valid_name("a-"));
        assert!(!valid_name(""));
    }

    #[test]
    fn artifacts_are_found_in_cargo_messages() {
        let line = r#"{"reason":"compiler-artifact","filenames":["/t/x.wasm","/t/libx.rlib"]}"#;
        assert_eq!(wasm_artifact(line), Some(PathBuf::from("/t/x.wasm")));
        assert_eq!(wasm_artifact(r#"{"reason":"build-finished"}"#), None);
        assert_eq!(wasm_artifact("not json"), None);
    }

    #[test]
    fn inspect_needs_one_abi_marker() {
        let with = wat::parse_str(
            r#"(module (func (export "proxy_abi_version_0_2_1")) (func (export "proxy_on_tick") (param i32)))"#,
        )
        .expect("valid wat");
        let (abi, callbacks) = inspect(&with).expect("a proxy-wasm module");
        assert_eq!(abi, "proxy_abi_version_0_2_1");
        assert_eq!(callbacks, 1);
        let without = wat::parse_str(r#"(module (func (export "f")))"#).expect("valid wat");
        assert!(inspect(&without).unwrap_err().to_string().contains("no proxy_abi_version"));
        assert!(inspect(b"garbage").is_err());
    }
}
