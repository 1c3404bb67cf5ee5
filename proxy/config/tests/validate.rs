//! Validation: every rejection names the field and the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use sluice_config::{FailPolicy, LbPolicy, Snapshot};

const BASE: &str = r#"
listeners:
  - name: main
    address: 127.0.0.1:8080
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - forward: { cluster: backend }
clusters:
  - name: backend
    endpoints: ["127.0.0.1:9000"]
"#;

fn load(yaml: &str) -> Result<Snapshot, String> {
    Snapshot::from_yaml(yaml, "test.yaml", Path::new(".")).map_err(|e| e.to_string())
}

/// Asserts that replacing `from` by `to` in the base config is rejected with `want` in the message.
fn rejects(from: &str, to: &str, want: &str) {
    assert!(BASE.contains(from), "base lacks {from:?}");
    let err = load(&BASE.replace(from, to)).expect_err(to);
    assert!(err.contains(want), "error {err:?} lacks {want:?}");
    assert!(err.starts_with("test.yaml: "), "error {err:?} does not name the file");
}

#[test]
fn the_base_config_is_valid_and_defaults_are_safe() {
    let s = load(BASE).unwrap();
    let l = &s.config().listeners[0];
    assert_eq!(l.limits.max_request_headers, 100);
    assert_eq!(l.limits.max_request_header_bytes, 60 * 1024);
    assert_eq!(l.limits.h2_max_concurrent_streams, 100);
    assert_eq!(s.config().admin.address.unwrap().ip().to_string(), "127.0.0.1");
    assert_eq!(s.config().clusters[0].lb, LbPolicy::RoundRobin);
}

#[test]
fn rejections_name_field_and_reason() {
    let cases = [
        (
            "cluster: backend",
            "cluster: nope",
            "listeners[0].virtual_hosts[0].routes[0].forward.cluster: unknown cluster `nope`",
        ),
        (
            "- forward: { cluster: backend }",
            "- { name: r }",
            "listeners[0].virtual_hosts[0].routes[0]: needs one of",
        ),
        ("127.0.0.1:9000", "127.0.0.1", "clusters[0].endpoints[0]: `127.0.0.1` is not `host:port`"),
        ("127.0.0.1:9000", "bad host:80", "clusters[0].endpoints[0]: invalid host name"),
        (
            "address: 127.0.0.1:8080",
            "address: nowhere",
            "listeners[0].address: invalid socket address syntax",
        ),
        ("domains: [\"*\"]", "domains: []", "listeners[0].virtual_hosts[0].domains: at least one domain"),
        ("domains: [\"*\"]", "domains: [\"a*b\"]", "invalid domain pattern `a*b`"),
        ("name: backend", "name: backend\n    lb: weird", "clusters[0].lb: unknown value `weird`"),
        (
            "name: backend",
            "name: backend\n    lb: { ring_hash: { } }",
            "clusters[0].lb.ring_hash: set exactly one",
        ),
        ("name: backend", "name: backend\n    connect_timeout: soon", "clusters[0].connect_timeout"),
        ("name: backend", "name: backend\n    unknown_field: 1", "unknown field `unknown_field`"),
        (
            "- forward: { cluster: backend }",
            "- match: { regex: \"(\" }\n            forward: { cluster: backend }",
            "match.regex: invalid regex",
        ),
        (
            "- forward: { cluster: backend }",
            "- match: { prefix: api }\n            forward: { cluster: backend }",
            "match.prefix: must start with `/`",
        ),
        (
            "- forward: { cluster: backend }",
            "- redirect: { code: 200 }",
            "redirect.code: 200 is not a redirect status",
        ),
        (
            "- forward: { cluster: backend }",
            "- forward: { clusters: [{ name: backend, weight: 0 }] }",
            "forward.clusters: weights must not all be zero",
        ),
        (
            "- forward: { cluster: backend }",
            "- forward: { cluster: backend, retry: { attempts: 50 } }",
            "forward.retry.attempts: at most 10 retries",
        ),
    ];
    for (from, to, want) in cases {
        rejects(from, to, want);
    }
}

#[test]
fn a_pathological_regex_is_rejected_by_size() {
    rejects(
        "- forward: { cluster: backend }",
        "- match: { regex: \"(a{1000}){1000}\" }\n            forward: { cluster: backend }",
        "invalid regex",
    );
}

#[test]
fn syntax_errors_carry_line_and_column() {
    let err = load("listeners:\n  - name: x\n    address: [oops\n").unwrap_err();
    assert!(err.contains("line"), "{err}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let yaml = BASE.replace("cluster: backend", "cluster: nope").replace("127.0.0.1:9000", "x");
    let err = load(&yaml).unwrap_err();
    assert!(err.contains("2 problems"), "{err}");
}

#[test]
fn filter_specs_parse_in_every_form() {
    let yaml = BASE.replace(
        "    virtual_hosts:",
        r#"    filters:
      - name: a
        module: a.wasm
        config: { k: [1, 2] }
        fail_policy: open
      - name: b
        module: "sha256:0000000000000000000000000000000000000000000000000000000000000000"
        config: raw string
        fail_policy: { reload: { base: 1s, max: 5s } }
        limits: { memory_bytes: 1048576, callback_timeout: 20ms }
    virtual_hosts:"#,
    );
    let s = load(&yaml).unwrap();
    let f = &s.config().listeners[0].filters;
    assert_eq!(f[0].plugin_config_bytes(), br#"{"k":[1,2]}"#);
    assert_eq!(f[0].fail_policy, FailPolicy::Open);
    assert_eq!(f[1].plugin_config_bytes(), b"raw string");
    assert!(f[1].module_digest().is_some());
    assert!(matches!(&f[1].fail_policy, FailPolicy::Reload(r) if r.base.as_secs() == 1));

    let bad = yaml.replace("fail_policy: open", "fail_policy: sometimes");
    let err = load(&bad).unwrap_err();
    assert!(err.contains("listeners[0].filters[0].fail_policy: unknown value `sometimes`"), "{err}");
    let dup = yaml.replace("name: b", "name: a");
    assert!(load(&dup).unwrap_err().contains("duplicate filter name `a`"));
    let digest = yaml.replace("sha256:0000", "sha256:zz00");
    assert!(load(&digest).unwrap_err().contains("64 lowercase hex"));
    let vm_id = yaml.replace("        fail_policy: open", "        fail_policy: open\n        vm_id: cache");
    assert_eq!(load(&vm_id).unwrap().config().listeners[0].filters[0].vm_id.as_deref(), Some("cache"));
    let empty = yaml.replace("        fail_policy: open", "        fail_policy: open\n        vm_id: \"\"");
    let err = load(&empty).unwrap_err();
    assert!(err.contains("listeners[0].filters[0].vm_id: must be 1 to 256 bytes when set"), "{err}");
}
