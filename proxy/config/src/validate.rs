//! Parsing and validation of the file form.

use std::collections::HashSet;

use crate::error::{ConfigError, Problem};
use crate::filter::{FailPolicy, FilterSpec};
use crate::model::*;

/// Parses YAML into the file form, naming the field and line of the first error.
pub(crate) fn parse_yaml(text: &str, source_name: &str) -> Result<Config, ConfigError> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, Config>(de).map_err(|err| {
        let field = err.path().to_string();
        let inner = err.into_inner();
        let location = inner.location().map(|l| (l.line(), l.column()));
        let mut reason = inner.to_string();
        // serde_yaml_ng appends " at line L column C" and may prefix the path;
        // we report both separately.
        if let Some(idx) = reason.find(" at line ") {
            reason.truncate(idx);
        }
        if let Some((prefix, rest)) = reason.split_once(": ")
            && !prefix.is_empty()
            && field.starts_with(prefix)
        {
            reason = rest.to_owned();
        }
        ConfigError::Invalid {
            source_name: source_name.to_owned(),
            problems: vec![Problem {
                field: if field == "." { String::new() } else { field },
                reason,
                location,
            }],
        }
    })
}

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn fail(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem { field: field.into(), reason: reason.into(), location: None });
    }
}

/// Checks every cross-reference and range. Returns all problems found.
pub(crate) fn validate(config: &Config) -> Vec<Problem> {
    let mut c = Checker { problems: Vec::new() };
    if config.workers == Some(0) {
        c.fail("workers", "must be at least 1");
    }

    let mut cluster_names = HashSet::new();
    for (i, cluster) in config.clusters.iter().enumerate() {
        let at = format!("clusters[{i}]");
        if !cluster_names.insert(cluster.name.as_str()) {
            c.fail(format!("{at}.name"), format!("duplicate cluster name `{}`", cluster.name));
        }
        check_cluster(&mut c, &at, cluster);
    }

    let mut listener_names = HashSet::new();
    let mut addresses = HashSet::new();
    for (i, listener) in config.listeners.iter().enumerate() {
        let at = format!("listeners[{i}]");
        if !listener_names.insert(listener.name.as_str()) {
            c.fail(format!("{at}.name"), format!("duplicate listener name `{}`", listener.name));
        }
        if listener.address.port() != 0 && !addresses.insert(listener.address) {
            c.fail(
                format!("{at}.address"),
                format!("address {} is used by another listener", listener.address),
            );
        }
        if Some(listener.address) == config.admin.address && listener.address.port() != 0 {
            c.fail(format!("{at}.address"), "address is used by the admin listener");
        }
        check_listener(&mut c, &at, listener, &cluster_names);
    }
    c.problems
}

fn check_listener(c: &mut Checker, at: &str, l: &Listener, clusters: &HashSet<&str>) {
    if l.name.is_empty() {
        c.fail(format!("{at}.name"), "must not be empty");
    }
    if l.protocols.is_empty() {
        c.fail(format!("{at}.protocols"), "at least one protocol is required");
    }
    if l.max_connections == 0 {
        c.fail(format!("{at}.max_connections"), "must be at least 1");
    }
    if let Some(tls) = &l.tls {
        if tls.certificates.is_empty() {
            c.fail(format!("{at}.tls.certificates"), "at least one certificate is required");
        }
        if tls.require_client_certificate && tls.client_ca.is_none() {
            c.fail(format!("{at}.tls.require_client_certificate"), "needs `client_ca`");
        }
        for (j, cert) in tls.certificates.iter().enumerate() {
            for name in &cert.server_names {
                if !valid_domain_pattern(name) || name.starts_with("*") && !name.starts_with("*.") {
                    c.fail(
                        format!("{at}.tls.certificates[{j}].server_names"),
                        format!("invalid server name `{name}`"),
                    );
                }
            }
        }
    }
    let lim = &l.limits;
    if lim.max_request_header_bytes < 1024 {
        c.fail(format!("{at}.limits.max_request_header_bytes"), "must be at least 1024");
    }
    if lim.max_request_headers == 0 {
        c.fail(format!("{at}.limits.max_request_headers"), "must be at least 1");
    }
    if lim.h2_max_concurrent_streams == 0 {
        c.fail(format!("{at}.limits.h2_max_concurrent_streams"), "must be at least 1");
    }
    if lim.h2_stream_window < 65_535 || lim.h2_connection_window < 65_535 {
        c.fail(format!("{at}.limits"), "HTTP/2 windows must be at least 65535 bytes");
    }
    check_chain(c, &format!("{at}.filters"), &l.filters);

    let mut domains = HashSet::new();
    let mut vhost_names = HashSet::new();
    for (j, vh) in l.virtual_hosts.iter().enumerate() {
        let vat = format!("{at}.virtual_hosts[{j}]");
        if !vhost_names.insert(vh.name.as_str()) {
            c.fail(format!("{vat}.name"), format!("duplicate virtual host name `{}`", vh.name));
        }
        if vh.domains.is_empty() {
            c.fail(format!("{vat}.domains"), "at least one domain is required");
        }
        for d in &vh.domains {
            let lower = d.to_ascii_lowercase();
            if !valid_domain_pattern(&lower) {
                c.fail(format!("{vat}.domains"), format!("invalid domain pattern `{d}`"));
            } else if !domains.insert(lower) {
                c.fail(format!("{vat}.domains"), format!("domain `{d}` is served by another virtual host"));
            }
        }
        let mut route_names = HashSet::new();
        for (k, route) in vh.routes.iter().enumerate() {
            let rat = format!("{vat}.routes[{k}]");
            if let Some(name) = &route.name
                && !route_names.insert(name.as_str())
            {
                c.fail(format!("{rat}.name"), format!("duplicate route name `{name}`"));
            }
            check_route(c, &rat, route, clusters);
        }
    }
}

/// `*`, `*.suffix`, `prefix.*` or a plain host name (letters, digits, `-`, `.`, optional `:port`).
fn valid_domain_pattern(d: &str) -> bool {
    if d == "*" {
        return true;
    }
    let core = d.strip_prefix("*.").or_else(|| d.strip_suffix(".*")).unwrap_or(d);
    !core.is_empty()
        && !core.contains('*')
        && core
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '.' | ':' | '_' | '[' | ']'))
}

fn check_route(c: &mut Checker, at: &str, r: &Route, clusters: &HashSet<&str>) {
    let m = &r.matcher;
    let path_conds = [m.path.is_some(), m.prefix.is_some(), m.regex.is_some()];
    if path_conds.iter().filter(|b| **b).count() > 1 {
        c.fail(format!("{at}.match"), "use only one of `path`, `prefix` and `regex`");
    }
    for (field, value) in [("path", &m.path), ("prefix", &m.prefix)] {
        if let Some(p) = value
            && !p.starts_with('/')
        {
            c.fail(format!("{at}.match.{field}"), format!("must start with `/`, got `{p}`"));
        }
    }
    if let Some(re) = &m.regex {
        check_regex(c, &format!("{at}.match.regex"), re);
    }
    for (i, method) in m.methods.iter().enumerate() {
        if http::Method::from_bytes(method.as_bytes()).is_err() {
            c.fail(format!("{at}.match.methods[{i}]"), format!("invalid method `{method}`"));
        }
    }
    for (i, h) in m.headers.iter().enumerate() {
        let hat = format!("{at}.match.headers[{i}]");
        if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
            c.fail(format!("{hat}.name"), format!("invalid header name `{}`", h.name));
        }
        check_value_match(c, &hat, h.exact.as_ref(), h.regex.as_ref(), h.present);
    }
    for (i, q) in m.query.iter().enumerate() {
        let qat = format!("{at}.match.query[{i}]");
        if q.name.is_empty() {
            c.fail(format!("{qat}.name"), "must not be empty");
        }
        check_value_match(c, &qat, q.exact.as_ref(), q.regex.as_ref(), q.present);
    }

    let actions = [r.forward.is_some(), r.redirect.is_some(), r.direct_response.is_some()];
    match actions.iter().filter(|b| **b).count() {
        0 => c.fail(at.to_owned(), "needs one of `forward`, `redirect` or `direct_response`"),
        1 => {}
        _ => c.fail(at.to_owned(), "use only one of `forward`, `redirect` and `direct_response`"),
    }
    if let Some(f) = &r.forward {
        check_forward(c, &format!("{at}.forward"), f, clusters);
    }
    if let Some(rd) = &r.redirect {
        if !matches!(rd.code, 301 | 302 | 303 | 307 | 308) {
            c.fail(format!("{at}.redirect.code"), format!("{} is not a redirect status", rd.code));
        }
        if rd.path.is_some() && rd.prefix_rewrite.is_some() {
            c.fail(format!("{at}.redirect"), "use only one of `path` and `prefix_rewrite`");
        }
        if let Some(s) = &rd.scheme
            && s != "http"
            && s != "https"
        {
            c.fail(format!("{at}.redirect.scheme"), format!("must be `http` or `https`, got `{s}`"));
        }
    }
    if let Some(d) = &r.direct_response {
        if !(200..=599).contains(&d.status) {
            c.fail(format!("{at}.direct_response.status"), format!("{} is not a valid status", d.status));
        }
        if let Some(ct) = &d.content_type
            && http::HeaderValue::from_str(ct).is_err()
        {
            c.fail(format!("{at}.direct_response.content_type"), "invalid header value");
        }
    }
    check_edits(c, &format!("{at}.request_headers"), &r.request_headers);
    check_edits(c, &format!("{at}.response_headers"), &r.response_headers);
    if let Some(rf) = &r.filters {
        if rf.mode == RouteFilterMode::Disable && !rf.chain.is_empty() {
            c.fail(format!("{at}.filters.chain"), "must be empty when `mode` is `disable`");
        }
        check_chain(c, &format!("{at}.filters.chain"), &rf.chain);
    }
}

fn check_value_match(
    c: &mut Checker,
    at: &str,
    exact: Option<&String>,
    regex: Option<&String>,
    present: Option<bool>,
) {
    let n = [exact.is_some(), regex.is_some(), present.is_some()].iter().filter(|b| **b).count();
    if n > 1 {
        c.fail(at.to_owned(), "use only one of `exact`, `regex` and `present`");
    }
    if let Some(re) = regex {
        check_regex(c, &format!("{at}.regex"), re);
    }
}

fn check_regex(c: &mut Checker, at: &str, re: &str) {
    if let Err(e) = compile_regex(re) {
        c.fail(at.to_owned(), format!("invalid regex: {e}"));
    }
}

/// Compiles a config regex anchored at both ends, with the size limit.
pub fn compile_regex(re: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(crate::REGEX_SIZE_LIMIT)
        .dfa_size_limit(crate::REGEX_SIZE_LIMIT * 4)
        .nest_limit(64)
        .build()
}

fn check_forward(c: &mut Checker, at: &str, f: &Forward, clusters: &HashSet<&str>) {
    match (&f.cluster, f.clusters.is_empty()) {
        (Some(name), true) => {
            if !clusters.contains(name.as_str()) {
                c.fail(format!("{at}.cluster"), format!("unknown cluster `{name}`"));
            }
        }
        (None, false) => {
            let mut total = 0u64;
            for (i, wc) in f.clusters.iter().enumerate() {
                if !clusters.contains(wc.name.as_str()) {
                    c.fail(format!("{at}.clusters[{i}].name"), format!("unknown cluster `{}`", wc.name));
                }
                total += u64::from(wc.weight);
            }
            if total == 0 {
                c.fail(format!("{at}.clusters"), "weights must not all be zero");
            }
        }
        (None, true) => c.fail(at.to_owned(), "needs `cluster` or `clusters`"),
        (Some(_), false) => c.fail(at.to_owned(), "use only one of `cluster` and `clusters`"),
    }
    if let Some(h) = &f.host_rewrite
        && http::uri::Authority::try_from(h.as_str()).is_err()
    {
        c.fail(format!("{at}.host_rewrite"), format!("invalid authority `{h}`"));
    }
    if let Some(p) = &f.prefix_rewrite
        && !p.starts_with('/')
    {
        c.fail(format!("{at}.prefix_rewrite"), format!("must start with `/`, got `{p}`"));
    }
    if let Some(r) = &f.retry {
        if r.attempts > 10 {
            c.fail(format!("{at}.retry.attempts"), "at most 10 retries");
        }
        if r.backoff.base.is_zero() || r.backoff.max < r.backoff.base {
            c.fail(format!("{at}.retry.backoff"), "`base` must be positive and not above `max`");
        }
        if !(0.0..=10.0).contains(&r.budget.ratio) {
            c.fail(format!("{at}.retry.budget.ratio"), "must be between 0 and 10");
        }
        for s in &r.statuses {
            if !(100..=599).contains(s) {
                c.fail(format!("{at}.retry.statuses"), format!("{s} is not a valid status"));
            }
        }
    }
}

fn check_edits(c: &mut Checker, at: &str, e: &HeaderEdits) {
    for (k, v) in e.add.iter().chain(e.set.iter()) {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            c.fail(at.to_owned(), format!("invalid header name `{k}`"));
        }
        if http::HeaderValue::from_str(v).is_err() {
            c.fail(at.to_owned(), format!("invalid value for header `{k}`"));
        }
    }
    for k in &e.remove {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            c.fail(at.to_owned(), format!("invalid header name `{k}`"));
        }
    }
}

fn check_chain(c: &mut Checker, at: &str, chain: &[FilterSpec]) {
    let mut names = HashSet::new();
    for (i, f) in chain.iter().enumerate() {
        let fat = format!("{at}[{i}]");
        if f.name.is_empty() {
            c.fail(format!("{fat}.name"), "must not be empty");
        } else if !names.insert(f.name.as_str()) {
            c.fail(format!("{fat}.name"), format!("duplicate filter name `{}` in the chain", f.name));
        }
        if f.module.is_empty() {
            c.fail(format!("{fat}.module"), "must not be empty");
        }
        if let Some(id) = &f.vm_id
            && (id.is_empty() || id.len() > 256)
        {
            c.fail(format!("{fat}.vm_id"), "must be 1 to 256 bytes when set");
        }
        if let Some(d) = f.module_digest()
            && (d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        {
            c.fail(format!("{fat}.module"), "a digest must be `sha256:` and 64 lowercase hex digits");
        }
        if f.limits.memory_bytes < 64 * 1024 {
            c.fail(format!("{fat}.limits.memory_bytes"), "must be at least one wasm page (65536)");
        }
        if f.limits.callback_timeout.is_zero() {
            c.fail(format!("{fat}.limits.callback_timeout"), "must be positive");
        }
        if let FailPolicy::Reload(r) = &f.fail_policy
            && (r.base.is_zero() || r.max < r.base)
        {
            c.fail(format!("{fat}.fail_policy.reload"), "`base` must be positive and not above `max`");
        }
    }
}

fn check_cluster(c: &mut Checker, at: &str, cl: &Cluster) {
    if cl.name.is_empty() {
        c.fail(format!("{at}.name"), "must not be empty");
    }
    if cl.endpoints.is_empty() {
        c.fail(format!("{at}.endpoints"), "at least one endpoint is required");
    }
    for (i, ep) in cl.endpoints.iter().enumerate() {
        if let Err(e) = parse_endpoint(ep) {
            c.fail(format!("{at}.endpoints[{i}]"), e);
        }
    }
    if cl.connect_timeout.is_zero() {
        c.fail(format!("{at}.connect_timeout"), "must be positive");
    }
    if let LbPolicy::RingHash(h) = &cl.lb {
        let n = [h.header.is_some(), h.cookie.is_some(), h.source_ip].iter().filter(|b| **b).count();
        if n != 1 {
            c.fail(format!("{at}.lb.ring_hash"), "set exactly one of `header`, `cookie` and `source_ip`");
        }
    }
    if let Some(hc) = &cl.health_check {
        if !hc.path.starts_with('/') {
            c.fail(format!("{at}.health_check.path"), "must start with `/`");
        }
        if hc.healthy_threshold == 0 || hc.unhealthy_threshold == 0 {
            c.fail(format!("{at}.health_check"), "thresholds must be at least 1");
        }
        if hc.interval.is_zero() || hc.timeout.is_zero() {
            c.fail(format!("{at}.health_check"), "`interval` and `timeout` must be positive");
        }
    }
    if let Some(od) = &cl.outlier_detection {
        if od.max_ejection_percent > 100 {
            c.fail(format!("{at}.outlier_detection.max_ejection_percent"), "must be at most 100");
        }
        if od.base_ejection_time.is_zero() {
            c.fail(format!("{at}.outlier_detection.base_ejection_time"), "must be positive");
        }
    }
}

/// An endpoint address as written: a host (IP or DNS name) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointAddr {
    /// IP literal (without brackets) or DNS name.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// Parses `host:port` or `[v6]:port`.
pub fn parse_endpoint(s: &str) -> Result<EndpointAddr, String> {
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Ok(EndpointAddr { host: sa.ip().to_string(), port: sa.port() });
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("`{s}` is not `host:port`"))?;
    let port: u16 = port.parse().map_err(|_| format!("invalid port in `{s}`"))?;
    if port == 0 {
        return Err(format!("port 0 in `{s}`"));
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        return Err(format!("invalid host name in `{s}`"));
    }
    Ok(EndpointAddr { host: host.to_owned(), port })
}
