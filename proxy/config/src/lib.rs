//! Sluice's configuration: the YAML file form, its validation, and the validated
//! [`Snapshot`] that is the only form the data plane accepts.
//!
//! This crate does no network I/O and knows nothing of hyper or wasmtime. It reads
//! a file when asked to ([`Snapshot::load`]); everything else is pure.

mod enums;
mod error;
pub mod filter;
pub mod model;
mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::{ConfigError, Problem};
pub use filter::{FailPolicy, FilterLimits, FilterSpec, ReloadPolicy};
pub use model::*;
pub use validate::{EndpointAddr, compile_regex, parse_endpoint};

/// Largest regex program accepted in a config (linear-time `regex`, compiled size).
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// A validated configuration. It can only be made by validation, so holding one
/// means every cross-reference resolves and every value is in range.
#[derive(Debug, Clone)]
pub struct Snapshot {
    config: Arc<Config>,
    source_name: Arc<str>,
    base_dir: Arc<Path>,
}

impl Snapshot {
    /// Reads and validates a YAML file. Relative paths in it are relative to its folder.
    pub fn load(path: &Path) -> Result<Snapshot, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { source_name: source_name.clone(), reason: e.to_string() })?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        Snapshot::from_yaml(&text, &source_name, &base_dir)
    }

    /// Parses and validates YAML text. `source_name` names it in errors.
    pub fn from_yaml(text: &str, source_name: &str, base_dir: &Path) -> Result<Snapshot, ConfigError> {
        let config = validate::parse_yaml(text, source_name)?;
        Snapshot::from_config(config, source_name, base_dir)
    }

    /// Validates an already-parsed configuration.
    pub fn from_config(config: Config, source_name: &str, base_dir: &Path) -> Result<Snapshot, ConfigError> {
        let problems = validate::validate(&config);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid { source_name: source_name.to_owned(), problems });
        }
        Ok(Snapshot { config: Arc::new(config), source_name: source_name.into(), base_dir: base_dir.into() })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where it came from (file name, or a control-plane version).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Resolves a path from the config against the config file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() { path.to_path_buf() } else { self.base_dir.join(path) }
    }

    /// Looks up a cluster by name.
    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.config.clusters.iter().find(|c| c.name == name)
    }
}
