//! End-to-end tests of the `sluice proxy` process: config checking, hot reload
//! through the watched file, graceful drain on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::{Backend, Sluice, get};

fn config(cluster_addr: std::net::SocketAddr) -> String {
    format!(
        r#"
admin: {{ address: "{{admin}}" }}
workers: 2
listeners:
  - name: main
    address: 127.0.0.1:0
    drain_timeout: 10s
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - forward: {{ cluster: backend }}
clusters:
  - name: backend
    endpoints: ["{cluster_addr}"]
"#
    )
}

fn check(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["proxy", "--check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn check_accepts_a_valid_file_and_names_the_problems_of_a_bad_one() {
    let (ok, out) = check(&config("127.0.0.1:9".parse().unwrap()).replace("{admin}", "127.0.0.1:0"));
    assert!(ok, "{out}");
    assert!(out.contains(": ok"), "{out}");

    let bad = config("127.0.0.1:9".parse().unwrap())
        .replace("{admin}", "127.0.0.1:0")
        .replace("cluster: backend", "cluster: nope");
    let (ok, out) = check(&bad);
    assert!(!ok);
    assert!(
        out.contains(
            "config.yaml: listeners[0].virtual_hosts[0].routes[0].forward.cluster: unknown cluster `nope`"
        ),
        "{out}"
    );

    let (ok, out) = check("listeners:\n  - name: x\n    address: not-an-address\n");
    assert!(!ok);
    assert!(out.contains("listeners[0].address"), "{out}");
    assert!(out.contains("line 3"), "{out}");

    let (ok, out) = check("listeners: [}");
    assert!(!ok);
    assert!(out.contains("config.yaml"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_the_watched_file_and_keeps_the_last_good_config() {
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let proxy = Sluice::start(&config(a.addr));
    let addr = proxy.addr("main");
    assert_eq!(get(addr, "/").await.2, "a");

    proxy.write_config(&config(b.addr));
    let applied = proxy.wait_for("config applied");
    assert_eq!(applied["fields"]["generation"], 2);
    assert_eq!(get(addr, "/").await.2, "b");

    // A bad file is rejected with file, field and reason; b keeps serving.
    proxy.write_config(&config(b.addr).replace("cluster: backend", "cluster: missing"));
    let rejected = proxy.wait_for("config rejected; the previous config keeps serving");
    let err = rejected["fields"]["error"].as_str().unwrap().to_owned();
    assert!(
        err.contains("config.yaml")
            && err.contains("forward.cluster")
            && err.contains("unknown cluster `missing`"),
        "{err}"
    );
    assert_eq!(get(addr, "/").await.2, "b");
    let (_, _, metrics) = get(proxy.admin, "/metrics").await;
    assert!(metrics.contains(r#"sluice_config_reloads_total{result="failed"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"sluice_config_reloads_total{result="ok"} 1"#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_under_load_fails_no_request() {
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let proxy = Sluice::start(&config(a.addr));
    let addr = proxy.addr("main");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (stop, ok) = (stop.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (status, _, body) = get(addr, "/").await;
                if status == 200 && (body == "a" || body == "b") {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.push((status, body));
                }
            }
            failures
        }));
    }
    for i in 0..6 {
        let target = if i % 2 == 0 { b.addr } else { a.addr };
        proxy.write_config(&config(target));
        proxy.wait_for("config applied");
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let failures = t.await.unwrap();
        assert!(failures.is_empty(), "failed requests during reload: {failures:?}");
    }
    assert!(ok.load(Ordering::Relaxed) > 50, "too few requests went through: {}", ok.load(Ordering::Relaxed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let (started_tx, started_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let started_tx = Arc::new(started_tx);
    let slow = Backend::start(move |_req| {
        let started_tx = started_tx.clone();
        async move {
            let _ = started_tx.send(());
            tokio::time::sleep(Duration::from_millis(500)).await;
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from("done")))
        }
    })
    .await;
    let mut proxy = Sluice::start(&config(slow.addr));
    let addr = proxy.addr("main");
    let in_flight = tokio::spawn(async move { get(addr, "/").await });
    let mut started_rx = started_rx;
    started_rx.recv().await.unwrap();
    proxy.terminate();
    proxy.wait_for("draining");
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "done"));
    let status = tokio::task::spawn_blocking(move || {
        let s = proxy.child.wait().unwrap();
        (s, proxy)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "exit status {status:?}");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener still accepting after exit");
}
