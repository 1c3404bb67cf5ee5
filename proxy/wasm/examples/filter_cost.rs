//! Measures what one wasm filter costs per request inside the host, with no
//! network: a VM per filter on this thread, and N requests driven through the
//! full context lifecycle (create, request headers, response headers, response
//! body, on_log/on_done/on_delete). Also times worker VM starts from the
//! compiled (cached) module, `VMS` times (default 200): each is the worker VM of a
//! new factory, built in the pool slot its validation VM just freed, and dropped
//! before the next. Once with the default `keep_resident_bytes` (the slot's pages
//! stay resident) and once with 0 (freed pages released: each VM faults its pages
//! back in, as a VM in a never-used slot does). It prints the median, mean and p90
//! of the instantiation proper (Store + instance + exports, from
//! `sluice_wasm_vm_instantiate_seconds`) and of the whole start (plus
//! `_initialize`, root context, `on_vm_start`, `on_configure`).
//!
//! The request loop runs `FILTERS` filters (environment, default 1; each its own
//! plugin and VM, as in `bench/run.sh`) and, with `POLLUTE=BYTES`, reads that
//! many bytes of other memory between requests, as a proxy's network work
//! evicts the VMs' state from the caches. The loop is also timed without the
//! filters, and the difference is printed per filter.
//!
//! `cargo run --release -p sluice-wasm --example filter_cost -- MODULE.wasm [N] [VMS]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
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

/// A sample of `name` (e.g. `…_sum{plugin="f"}`) in the registry's text output.
fn sample(registry: &prometheus::Registry, name: &str) -> f64 {
    let mut out = Vec::new();
    prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &registry.gather(), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let prefix = format!("{name}{{plugin=\"f\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Median and mean, in µs.
fn summary(mut samples: Vec<f64>) -> String {
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    let p90 = samples[samples.len() * 9 / 10];
    format!(
        "median {:.2} µs, mean {:.2} µs, p90 {:.2} µs",
        samples[samples.len() / 2] * 1e6,
        mean * 1e6,
        p90 * 1e6
    )
}

/// Builds `count` worker VMs, each on a new factory of `spec` (the factory's
/// validation VM is built and dropped before the timed worker VM), each dropped
/// before the next. Returns (instantiate, whole start) samples in seconds.
fn vm_starts(
    host: &WasmHost,
    registry: &prometheus::Registry,
    spec: &FilterSpec,
    count: usize,
) -> (Vec<f64>, Vec<f64>) {
    let here = std::env::current_dir().unwrap();
    let sum = "sluice_wasm_vm_instantiate_seconds_sum";
    let (mut inst, mut whole) = (Vec::new(), Vec::new());
    for _ in 0..count {
        let factory = host
            .load(spec, &LoadContext { base_dir: &here, clusters: &[], node: &Default::default() })
            .unwrap();
        let before = sample(registry, sum);
        let t = Instant::now();
        factory.prepare_worker();
        whole.push(t.elapsed().as_secs_f64());
        inst.push(sample(registry, sum) - before);
    }
    (inst, whole)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let module = args.get(1).expect("usage: filter_cost MODULE.wasm [N] [VMS]").clone();
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let vms: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(200);
    let registry = prometheus::Registry::new();
    let host = WasmHost::new(HostOptions::default(), &registry, Arc::new(NoCallouts)).unwrap();
    let spec: FilterSpec =
        serde_json::from_value(serde_json::json!({ "name": "f", "module": module })).unwrap();
    let registry0 = prometheus::Registry::new();
    let options0 = HostOptions { keep_resident_bytes: 0, ..HostOptions::default() };
    let host0 = WasmHost::new(options0, &registry0, Arc::new(NoCallouts)).unwrap();
    let here = std::env::current_dir().unwrap();
    let t = Instant::now();
    let factory =
        host.load(&spec, &LoadContext { base_dir: &here, clusters: &[], node: &Default::default() }).unwrap();
    println!("load (compile or cache, admit, one VM configured): {:?}", t.elapsed());
    let env =
        |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (count, pollute) = (env("FILTERS", 1).max(1), env("POLLUTE", 0));
    let mut chain = vec![factory.clone()];
    for i in 2..=count {
        let spec: FilterSpec =
            serde_json::from_value(serde_json::json!({ "name": format!("f{i}"), "module": module })).unwrap();
        chain.push(
            host.load(&spec, &LoadContext { base_dir: &here, clusters: &[], node: &Default::default() })
                .unwrap(),
        );
    }
    let other = vec![1u64; pollute / 8];

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        // VM instantiation on this worker, from the compiled module.
        let t = Instant::now();
        for f in &chain {
            f.prepare_worker();
        }
        println!(
            "first worker VM start (instantiate + _initialize + on_vm_start + on_configure): {:?}",
            t.elapsed()
        );
        for (what, host, registry) in [
            ("default keep_resident_bytes: pages stay resident", &host, &registry),
            ("keep_resident_bytes 0: freed pages released, faulted back in", &host0, &registry0),
        ] {
            let (inst, whole) = vm_starts(host, registry, &spec, vms);
            println!("{vms} worker VMs, {what}:");
            println!("  instantiate (Store + instance + exports): {}", summary(inst));
            println!(
                "  whole start (+ _initialize, root context, on_vm_start, on_configure): {}",
                summary(whole)
            );
        }

        let remote = "127.0.0.1:40000".parse().unwrap();
        let local_addr = "127.0.0.1:8080".parse().unwrap();
        let run = |requests: usize, filter: bool| {
            let (chain, other) = (&chain, &other);
            async move {
                let t = Instant::now();
                for i in 0..requests {
                    let info = StreamInfo::new(
                        format!("{i}"),
                        1,
                        remote,
                        local_addr,
                        "l".into(),
                        http::Version::HTTP_11,
                        Instant::now(),
                    );
                    let mut filters: Vec<_> =
                        if filter { chain.iter().map(|f| f.new_filter(&info)).collect() } else { Vec::new() };
                    let (mut req, _) = http::Request::get("http://example.com/path")
                        .header("x-tenant", "acme")
                        .header("user-agent", "bench")
                        .body(())
                        .unwrap()
                        .into_parts();
                    for f in filters.iter_mut() {
                        sluice_filter::request_headers(&mut **f, &mut req, &info, true).await.unwrap();
                    }
                    // As the HTTP/1.1 client hands them over: fields still encoded.
                    let lines = b"Content-Type: text/plain\r\nContent-Length: 19\r\n".to_vec();
                    let encoded = sluice_filter::EncodedFields { lines, count: 2, length: Some(19), has_date: false };
                    let mut resp = sluice_filter::ResponseHead::with_encoded(
                        http::Response::new(()).into_parts().0,
                        Some(Box::new(encoded)),
                    );
                    for f in filters.iter_mut() {
                        sluice_filter::response_headers(&mut **f, &mut resp, &info, false).await.unwrap();
                    }
                    // As the proxy hands it on: shared with the read buffer.
                    let mut body = sluice_filter::BodyBuf::from(Bytes::from_static(b"hello from backend\n"));
                    for f in filters.iter_mut() {
                        sluice_filter::response_body(&mut **f, &mut body, &info, true).await.unwrap();
                    }
                    let view = LogView {
                        request_added: None,
                        request: Some(&req),
                        response: Some(&resp),
                        request_trailers: None,
                        response_trailers: None,
                    };
                    for f in filters.iter_mut() {
                        f.on_log(&view, &info);
                    }
                    std::hint::black_box(&body);
                    drop(filters);
                    std::hint::black_box(other.iter().sum::<u64>());
                }
                t.elapsed()
            }
        };
        run(n / 10, true).await; // warm-up
        run(n / 10, false).await;
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            with.push(run(n / 5, true).await.as_secs_f64() * 5e6 / n as f64);
            without.push(run(n / 5, false).await.as_secs_f64() * 5e6 / n as f64);
        }
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let (w, wo) = (best(&with), best(&without));
        println!(
            "per request through {count} filter(s): {w:.3} µs ({n} requests, best of 5 rounds, {pollute} bytes read between requests)"
        );
        println!(
            "  the same loop without the filters: {wo:.3} µs; per filter: {:.3} µs",
            (w - wo) / count as f64
        );
    });
}
