//! Config sources: where validated snapshots come from. The file source
//! watches the config file and yields a snapshot per change; an invalid file
//! yields an error naming file, field and reason, and the proxy keeps the
//! config it has.
//!
//! The watch is on the file's folder, because editors and `mv` replace the
//! file (a watch on the file itself would be lost) and Kubernetes swaps a
//! `..data` symlink in the folder. It asks only for the events that end a
//! change: a file closed after writing, moved, created, deleted, or its
//! attributes changed (`touch` forces a reload). On Linux that is an inotify
//! mask without `IN_MODIFY` and `IN_OPEN`, so a file written next to the
//! config (a log, say) does not wake the proxy at every write: notify's fixed
//! mask does, and beside a load generator's request log that was 25,000
//! wake-ups and a tenth of a core in 5 s. Other systems use notify.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_config::{ConfigError, Snapshot};
use tokio::sync::mpsc;

/// A running file watch. Dropping it stops the watch.
pub struct FileSource {
    #[cfg(target_os = "linux")]
    task: tokio::task::JoinHandle<()>,
    #[cfg(not(target_os = "linux"))]
    _watcher: notify::RecommendedWatcher,
    events: Arc<AtomicU64>,
}

impl FileSource {
    /// File-system events the watch has received (on any file of the folder).
    pub fn events_seen(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
}

#[cfg(target_os = "linux")]
impl Drop for FileSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether an event on `name` in the folder concerns the config `file`: the
/// file itself, or Kubernetes' `..data` symlink (a ConfigMap update).
fn is_ours(name: &OsStr, file: &OsStr) -> bool {
    name == file || name == "..data"
}

/// Watches `path`; every change (debounced) sends the parse-and-validate result.
/// Must be called inside a tokio runtime.
pub fn watch_file(
    path: &Path,
) -> std::io::Result<(FileSource, mpsc::Receiver<Result<Snapshot, ConfigError>>)> {
    let path: PathBuf = path.to_path_buf();
    let file_name = path.file_name().map(OsStr::to_owned).unwrap_or_default();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let events = Arc::new(AtomicU64::new(0));
    let source = start(&dir, file_name, events, raw_tx)?;
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
    Ok((source, rx))
}

#[cfg(target_os = "linux")]
fn start(
    dir: &Path,
    file: OsString,
    events: Arc<AtomicU64>,
    raw_tx: mpsc::UnboundedSender<()>,
) -> std::io::Result<FileSource> {
    use futures_util::StreamExt;
    use inotify::{Inotify, WatchMask};

    let inotify = Inotify::init()?;
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF;
    inotify.watches().add(dir, mask)?;
    let mut stream = inotify.into_event_stream([0u8; 4096])?;
    let seen = events.clone();
    let task = tokio::spawn(async move {
        while let Some(ev) = stream.next().await {
            seen.fetch_add(1, Ordering::Relaxed);
            match ev {
                // An event on the folder itself (deleted, moved) has no name.
                Ok(ev) if ev.name.as_deref().is_none_or(|n| is_ours(n, &file)) => {
                    if raw_tx.send(()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "config file watch failed; file changes are no longer applied");
                    return;
                }
            }
        }
    });
    Ok(FileSource { task, events })
}

#[cfg(not(target_os = "linux"))]
fn start(
    dir: &Path,
    file: OsString,
    events: Arc<AtomicU64>,
    raw_tx: mpsc::UnboundedSender<()>,
) -> std::io::Result<FileSource> {
    use notify::{RecursiveMode, Watcher};

    let seen = events.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        seen.fetch_add(1, Ordering::Relaxed);
        if let Ok(ev) = ev {
            let ours = ev.paths.iter().any(|p| p.file_name().is_some_and(|n| is_ours(n, &file)));
            let relevant = !matches!(ev.kind, notify::EventKind::Access(_));
            if ours && relevant {
                let _ = raw_tx.send(());
            }
        }
    })
    .map_err(std::io::Error::other)?;
    watcher.watch(dir, RecursiveMode::NonRecursive).map_err(std::io::Error::other)?;
    Ok(FileSource { _watcher: watcher, events })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn config(body: &str) -> String {
        format!(
            "listeners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes:\n          - direct_response: {{ status: 200, body: \"{body}\" }}\n"
        )
    }

    async fn next(rx: &mut mpsc::Receiver<Result<Snapshot, ConfigError>>) -> Result<Snapshot, ConfigError> {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a reload within 10 s")
            .expect("the watch is running")
    }

    #[tokio::test]
    async fn a_save_reloads_and_a_bad_save_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.yaml");
        std::fs::write(&path, config("a")).unwrap();
        let (_src, mut rx) = watch_file(&path).unwrap();

        std::fs::write(&path, config("b")).unwrap();
        assert!(next(&mut rx).await.is_ok());

        // Replaced by a rename, as editors and `mv` do.
        let tmp = dir.path().join("sluice.yaml.tmp");
        std::fs::write(&tmp, "listeners: [ {").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let err = next(&mut rx).await.expect_err("a broken file is rejected");
        assert!(err.to_string().contains("sluice.yaml"), "{err}");
    }

    /// Linux only: notify's mask (used elsewhere) wakes the watch at every write.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn writes_to_a_file_beside_the_config_do_not_wake_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.yaml");
        std::fs::write(&path, config("a")).unwrap();
        let (src, mut rx) = watch_file(&path).unwrap();

        // A log beside the config, written line by line and kept open.
        let mut log = std::fs::File::create(dir.path().join("requests.log")).unwrap();
        for i in 0..2000 {
            writeln!(log, "request {i}").unwrap();
            // Let the watch task run between writes, as a busy proxy's would.
            if i % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        // A save of the config still reloads it.
        std::fs::write(&path, config("b")).unwrap();
        assert!(next(&mut rx).await.is_ok());
        // The log's creation and the config's close after writing; nothing per write.
        assert!(src.events_seen() <= 4, "{} events for 2000 writes beside the config", src.events_seen());
    }
}
