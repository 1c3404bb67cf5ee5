//! Config sources: where validated snapshots come from. The file source
//! watches the config file (notify) and yields a snapshot per change; an
//! invalid file yields an error naming file, field and reason, and the proxy
//! keeps the config it has.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use sluice_config::{ConfigError, Snapshot};
use tokio::sync::mpsc;

/// A running file watch. Dropping it stops the watch.
pub struct FileSource {
    _watcher: notify::RecommendedWatcher,
}

/// Watches `path`; every change (debounced) sends the parse-and-validate result.
pub fn watch_file(
    path: &Path,
) -> Result<(FileSource, mpsc::Receiver<Result<Snapshot, ConfigError>>), notify::Error> {
    let path: PathBuf = path.to_path_buf();
    let file_name = path.file_name().map(|n| n.to_owned());
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            let ours = ev.paths.iter().any(|p| p.file_name() == file_name.as_deref());
            let relevant = !matches!(ev.kind, notify::EventKind::Access(_));
            if ours && relevant {
                let _ = raw_tx.send(());
            }
        }
    })?;
    // Watch the folder: editors and `mv` replace the file, which a file watch would lose.
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Debounce: wait for the writes of one save to settle.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while raw_rx.try_recv().is_ok() {}
            let p = path.clone();
            let result = tokio::task::spawn_blocking(move || Snapshot::load(&p))
                .await
                .unwrap_or_else(|e| Err(ConfigError::field(&path.display().to_string(), "", e.to_string())));
            if tx.send(result).await.is_err() {
                return;
            }
        }
    });
    Ok((FileSource { _watcher: watcher }, rx))
}
