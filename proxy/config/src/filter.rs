//! Filter specifications: one entry of a filter chain.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One filter of a chain: a proxy-wasm plugin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// Plugin name, unique within a chain; the `plugin_name` property and the metrics label.
    pub name: String,
    /// Where the module comes from: a file path (relative paths are relative to the
    /// config file) or `sha256:<64 hex>` for a module stored by the control plane.
    pub module: String,
    /// The plugin's root id (selects a plugin inside a multi-plugin module).
    #[serde(default)]
    pub root_id: String,
    /// The scope of the plugin's shared data and queues, Envoy's
    /// `vm_config.vm_id`: plugins naming the same `vm_id` share them (a
    /// service plugin filling a cache an HTTP filter reads). Default: the
    /// plugin's name, so each plugin has its own.
    #[serde(default)]
    pub vm_id: Option<String>,
    /// VM configuration, given to `on_vm_start`: any YAML value (passed as JSON bytes)
    /// or a string (passed as its raw bytes).
    #[serde(default)]
    pub vm_config: Option<serde_json::Value>,
    /// Plugin configuration, given to `on_configure`: any YAML value (passed as JSON
    /// bytes) or a string (passed as its raw bytes).
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// What happens when the filter fails at run time.
    #[serde(default)]
    pub fail_policy: FailPolicy,
    /// Sandbox limits.
    #[serde(default)]
    pub limits: FilterLimits,
    /// Environment variables the guest sees through WASI `environ_get`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl FilterSpec {
    /// The module's digest when it names a stored module (`sha256:<hex>`).
    pub fn module_digest(&self) -> Option<&str> {
        self.module.strip_prefix("sha256:")
    }

    /// The module's file path when it names a file.
    pub fn module_path(&self) -> Option<PathBuf> {
        if self.module_digest().is_some() { None } else { Some(PathBuf::from(&self.module)) }
    }

    /// The bytes handed to `on_configure`.
    pub fn plugin_config_bytes(&self) -> Vec<u8> {
        value_bytes(self.config.as_ref())
    }

    /// The bytes handed to `on_vm_start`.
    pub fn vm_config_bytes(&self) -> Vec<u8> {
        value_bytes(self.vm_config.as_ref())
    }
}

fn value_bytes(value: Option<&serde_json::Value>) -> Vec<u8> {
    match value {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::String(s)) => s.as_bytes().to_vec(),
        Some(other) => other.to_string().into_bytes(),
    }
}

/// The fail policy of a filter: what a trap, a deadline or an out-of-memory does.
/// Written `closed`, `open`, `reload`, or `{ reload: { base: 100ms, ... } }`.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailPolicy {
    /// Answer 503 with a reason (the default; right for security filters).
    #[default]
    Closed,
    /// Skip the failed filter and go on.
    Open,
    /// Answer 503 for the failing request, then start a fresh VM for the next ones,
    /// with exponential backoff and a crash-loop cap.
    Reload(ReloadPolicy),
}

/// Reload backoff for [`FailPolicy::Reload`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadPolicy {
    /// First wait before a new VM.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// Longest wait.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// After this many reloads without a successful request in between, stop
    /// reloading and fail closed.
    pub max_consecutive: u32,
}

impl Default for ReloadPolicy {
    fn default() -> Self {
        ReloadPolicy { base: Duration::from_millis(100), max: Duration::from_secs(30), max_consecutive: 10 }
    }
}

/// Sandbox limits of a filter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FilterLimits {
    /// Linear memory cap per VM, in bytes.
    pub memory_bytes: u64,
    /// Time budget of one callback (enforced by epoch interruption).
    #[serde(with = "humantime_serde")]
    pub callback_timeout: Duration,
    /// Largest module accepted, in bytes.
    pub max_module_bytes: u64,
    /// Time a paused request may wait for the filter to resume it (callouts, timers).
    #[serde(with = "humantime_serde")]
    pub pause_timeout: Duration,
}

impl Default for FilterLimits {
    fn default() -> Self {
        FilterLimits {
            memory_bytes: 64 * 1024 * 1024,
            callback_timeout: Duration::from_millis(100),
            max_module_bytes: 16 * 1024 * 1024,
            pause_timeout: Duration::from_secs(30),
        }
    }
}

impl<'de> Deserialize<'de> for FailPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::enums::one_of(
            d,
            "a fail policy: `closed`, `open`, `reload` or `{ reload: {...} }`",
            |name| match name {
                "closed" => Some(FailPolicy::Closed),
                "open" => Some(FailPolicy::Open),
                "reload" => Some(FailPolicy::Reload(ReloadPolicy::default())),
                _ => None,
            },
            |key, map| match key {
                "reload" => Some(serde_yaml_ng::from_value(map).map(FailPolicy::Reload)),
                _ => None,
            },
        )
    }
}
