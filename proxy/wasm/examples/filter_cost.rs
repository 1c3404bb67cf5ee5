//! Measures what one wasm filter costs per request inside the host, with no
//! network: a VM per filter on this thread, and N requests driven through the
//! full context lifecycle (create, request headers, response headers, response
//! body, on_log/on_done/on_delete). Also times VM instantiation from the
//! compiled (cached) module.
//!
//! `cargo run --release -p sluice-wasm --example filter_cost -- MODULE.wasm [N]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use sluice_config::FilterSpec;
use sluice_filter::{
    CalloutClient, CalloutError, CalloutResponse, FilterLoader, LoadContext, LocalBoxFuture, LogView,
    StreamInfo,
};
use sluice_wasm::{HostOptions, WasmHost};

struct NoCallouts;

impl CalloutClient for NoCallouts {
    fn call(
        &self,
        cluster: &str,
        _request: http::Request<Bytes>,
        _timeout: std::time::Duration,
    ) -> LocalBoxFuture<'static, Result<CalloutResponse, CalloutError>> {
        let c = cluster.to_owned();
        Box::pin(async move { Err(CalloutError::UnknownCluster(c)) })
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let module = args.get(1).expect("usage: filter_cost MODULE.wasm [N]").clone();
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let registry = prometheus::Registry::new();
    let host = WasmHost::new(HostOptions::default(), &registry, Arc::new(NoCallouts)).unwrap();
    let spec: FilterSpec =
        serde_json::from_value(serde_json::json!({ "name": "f", "module": module })).unwrap();
    let here = std::env::current_dir().unwrap();
    let t = Instant::now();
    let factory = host.load(&spec, &LoadContext { base_dir: &here, clusters: &[] }).unwrap();
    println!("load (compile or cache, admit, one VM configured): {:?}", t.elapsed());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        // VM instantiation on this worker, from the compiled module.
        let t = Instant::now();
        factory.prepare_worker();
        println!(
            "worker VM start (instantiate + _initialize + on_vm_start + on_configure): {:?}",
            t.elapsed()
        );

        let remote = "127.0.0.1:40000".parse().unwrap();
        let local_addr = "127.0.0.1:8080".parse().unwrap();
        let run = |count: usize| {
            let factory = factory.clone();
            async move {
                let t = Instant::now();
                for i in 0..count {
                    let info = StreamInfo::new(
                        format!("{i}"),
                        1,
                        remote,
                        local_addr,
                        "l".into(),
                        http::Version::HTTP_11,
                    );
                    let mut f = factory.new_filter(&info);
                    let (mut req, _) = http::Request::get("http://example.com/path")
                        .header("x-tenant", "acme")
                        .header("user-agent", "bench")
                        .body(())
                        .unwrap()
                        .into_parts();
                    sluice_filter::request_headers(&mut *f, &mut req, &info, true).await.unwrap();
                    let (mut resp, _) = http::Response::builder()
                        .header("content-type", "text/plain")
                        .header("content-length", "19")
                        .body(())
                        .unwrap()
                        .into_parts();
                    sluice_filter::response_headers(&mut *f, &mut resp, &info, false).await.unwrap();
                    let mut body = BytesMut::from(&b"hello from backend\n"[..]);
                    sluice_filter::response_body(&mut *f, &mut body, &info, true).await.unwrap();
                    let view = LogView {
                        request: &req,
                        response: Some(&resp),
                        request_trailers: None,
                        response_trailers: None,
                    };
                    f.on_log(&view, &info);
                }
                t.elapsed()
            }
        };
        run(n / 10).await; // warm-up
        let elapsed = run(n).await;
        println!(
            "per request through one filter: {:.3} µs ({n} requests)",
            elapsed.as_secs_f64() * 1e6 / n as f64
        );
    });
}
