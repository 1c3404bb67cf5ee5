//! Support for end-to-end tests of the real `sluice` binary: start it on a
//! YAML file, learn its bound ports from its JSON logs, wait for log events
//! (instead of sleeping), build wasm fixtures from source.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running `sluice proxy` process.
pub struct Sluice {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub admin: SocketAddr,
    pub listeners: HashMap<String, SocketAddr>,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    rx: mpsc::Receiver<serde_json::Value>,
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sluice {
    /// Writes `yaml` to a temp `config.yaml` and starts the proxy on it. Listener
    /// addresses may use port 0; `{admin}` becomes `127.0.0.1:0`.
    pub fn start(yaml: &str) -> Sluice {
        Sluice::start_with(yaml, &[])
    }

    /// [`Sluice::start`] with more `sluice proxy` arguments.
    pub fn start_with(yaml: &str, args: &[&str]) -> Sluice {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml.replace("{admin}", "127.0.0.1:0")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["proxy", "--config"])
            .arg(&config)
            .args(args)
            .args(["--log-format", "json", "--log", "info"])
            .env("SLUICE_CACHE_DIR", dir.path().join("cache"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let keep = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or(serde_json::json!({ "raw": line }));
                keep.lock().unwrap().push(v.clone());
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut s = Sluice {
            child,
            dir,
            config,
            admin: "0.0.0.0:0".parse().unwrap(),
            listeners: HashMap::new(),
            lines,
            rx,
        };
        let expected = yaml.matches("- name:").count();
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.admin.port() == 0 || s.listeners.is_empty() {
            let v = s.next_line(deadline).unwrap_or_else(|| panic!("proxy did not start: {:?}", s.logs()));
            let f = &v["fields"];
            match f["message"].as_str() {
                Some("admin listening") => s.admin = f["address"].as_str().unwrap().parse().unwrap(),
                Some("listening") => {
                    s.listeners.insert(
                        f["listener"].as_str().unwrap().to_owned(),
                        f["address"].as_str().unwrap().parse().unwrap(),
                    );
                }
                _ => {}
            }
            let _ = expected;
        }
        s
    }

    fn next_line(&self, deadline: Instant) -> Option<serde_json::Value> {
        let left = deadline.checked_duration_since(Instant::now())?;
        self.rx.recv_timeout(left).ok()
    }

    /// Waits for a log line whose message equals `message`, returning it.
    pub fn wait_for(&self, message: &str) -> serde_json::Value {
        if tokio::runtime::Handle::try_current().is_ok() {
            return tokio::task::block_in_place(|| self.wait_for_blocking(message));
        }
        self.wait_for_blocking(message)
    }

    fn wait_for_blocking(&self, message: &str) -> serde_json::Value {
        self.wait_for_line(message, |m| m == message)
    }

    /// Waits for a log line whose message starts with `prefix`; returns the message.
    pub fn wait_for_prefix(&self, prefix: &str) -> String {
        let find = || self.wait_for_line(prefix, |m| m.starts_with(prefix));
        let v = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(find),
            Err(_) => find(),
        };
        v["fields"]["message"].as_str().unwrap_or_default().to_owned()
    }

    fn wait_for_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self
                .next_line(deadline)
                .unwrap_or_else(|| panic!("no `{what}` log; logs: {:?}", self.logs()));
            if v["fields"]["message"].as_str().is_some_and(&matches) {
                return v;
            }
        }
    }

    /// All log lines so far.
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap().clone()
    }

    /// The address of a listener.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listeners[name]
    }

    /// Rewrites the config file (atomically, by rename, as editors and
    /// ConfigMap updates do).
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.path().join(".config.yaml.tmp");
        std::fs::write(&tmp, yaml.replace("{admin}", "127.0.0.1:0")).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let ok = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }
}

/// An HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `http://addr{path}`, returning (status, headers, body text).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, http::HeaderMap, String) {
    get_with(addr, path, &[]).await
}

/// [`get`] with these request fields.
pub async fn get_with(
    addr: SocketAddr,
    path: &str,
    fields: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    for (name, value) in fields {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// Builds a cargo workspace of wasm fixtures (once per test binary and
/// manifest) and returns the folder holding its `.wasm` files.
pub fn build_wasm(manifest: &Path, target: &str, profile: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<(PathBuf, String), PathBuf>>> = OnceLock::new();
    let map = BUILT.get_or_init(Default::default);
    let mut map = map.lock().unwrap();
    let key = (manifest.to_path_buf(), target.to_owned());
    if let Some(p) = map.get(&key) {
        return p.clone();
    }
    let target_dir = root().join("target/wasm-fixtures");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.arg("build")
        .arg("--target")
        .arg(target)
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(&target_dir);
    if profile == "release" {
        cmd.arg("--release");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "building {}: {}",
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = target_dir.join(target).join(profile);
    map.insert(key, dir.clone());
    dir
}

/// Polls `f` until it returns `Some`, up to `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A hyper backend on 127.0.0.1:0 for process tests (HTTP/1.1 and h2c).
pub struct Backend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Serves `handler` for every request.
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = http::Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let handler = handler.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let handler = handler.clone();
                        async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, task }
    }

    /// Answers 200 with `name` as the body.
    pub async fn named(name: &'static str) -> Backend {
        Backend::start(move |_req| async move { http::Response::new(Full::new(Bytes::from(name))) }).await
    }
}

/// The `sink` fixture: a proxy-wasm 0.2.5 filter exercising every host-call family.
pub fn sink() -> PathBuf {
    build_wasm(&root().join("proxy/wasm/tests/fixtures/Cargo.toml"), "wasm32-wasip1", "release")
        .join("sink.wasm")
}

/// A backend answering each request with its path, and its fields as
/// `x-echo-<name>` (`/bytes/even` answers `0`).
pub async fn echo_backend() -> Backend {
    Backend::start(|req| async move {
        // `/late-body` asserts what the sink's request body phase saw at the
        // body's end: answered before the end, the exchange could finish (and
        // the request body be dropped) first.
        let (parts, body) = req.into_parts();
        if parts.uri.path() == "/late-body" {
            body.collect().await.unwrap();
        }
        let req = http::Request::from_parts(parts, ());
        // The sink's callout allows when the first byte of this answer is even ('0').
        let body =
            if req.uri().path() == "/bytes/even" { "0".to_owned() } else { req.uri().path().to_owned() };
        let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
        for (k, v) in req.headers() {
            if let Ok(n) = http::HeaderName::from_bytes(format!("x-echo-{k}").as_bytes()) {
                r.headers_mut().append(n, v.clone());
            }
        }
        r
    })
    .await
}
