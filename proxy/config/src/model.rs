//! The configuration model: what an operator writes in YAML (file form).
//!
//! Every field has a documented default so that a minimal file is a working
//! proxy with safe limits. The same types serialize back to JSON for the
//! admin `/config` endpoint. A [`crate::Snapshot`] can only be built by
//! validation, which is what the data plane accepts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::filter::FilterSpec;

/// The whole proxy configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This proxy's identity (Envoy's bootstrap `node`): filters read it as
    /// `xds.node.*`.
    #[serde(default)]
    pub node: Node,
    /// The admin listener (metrics, live config, health).
    #[serde(default)]
    pub admin: Admin,
    /// Worker threads; each owns its listeners' accept loop, upstream pools and filter VMs.
    /// Default: the number of CPUs.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Access log settings.
    #[serde(default)]
    pub access_log: AccessLog,
    /// Downstream listeners.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Upstream clusters.
    #[serde(default)]
    pub clusters: Vec<Cluster>,
}

/// This proxy's identity, as Envoy's bootstrap `node`: what a filter reads as
/// `xds.node.id`, `xds.node.cluster` and `xds.node.metadata.<key>` (Istio's
/// filters read the workload's name, namespace, labels … there).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// The node's id (Istio: `sidecar~10.1.2.3~pod.ns~ns.svc.cluster.local`).
    #[serde(default)]
    pub id: String,
    /// The service cluster the node belongs to.
    #[serde(default)]
    pub cluster: String,
    /// Free-form facts: any YAML mapping (a `google.protobuf.Struct`).
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// Metadata on a route, a virtual host or a cluster, in Envoy's shape: what a
/// filter reads as `xds.route_metadata`, `xds.virtual_host_metadata`,
/// `xds.cluster_metadata` (`…filter_metadata.<namespace>.<key>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Facts by namespace (by convention a filter's name): any YAML mapping each.
    #[serde(default)]
    pub filter_metadata: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
}

impl Metadata {
    /// Nothing in it.
    pub fn is_empty(&self) -> bool {
        self.filter_metadata.is_empty()
    }
}

/// The admin listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address of the admin listener; loopback by default. `null` disables it.
    #[serde(default = "default_admin_address")]
    pub address: Option<SocketAddr>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin { address: default_admin_address() }
    }
}

fn default_admin_address() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9901)))
}

/// Access log settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// `off` (default), `text` or `json`. Lines go to stdout.
    #[serde(default)]
    pub format: AccessLogFormat,
}

/// The access log line format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// No access log.
    #[default]
    Off,
    /// One human-readable line per request.
    Text,
    /// One JSON object per request.
    Json,
}

/// A downstream listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Unique name; used in metrics and logs.
    pub name: String,
    /// Socket address to bind.
    pub address: SocketAddr,
    /// Downstream TLS; absent means plaintext (HTTP/1.1 and h2c prior knowledge).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Accepted downstream protocols. Default: both.
    #[serde(default = "default_protocols")]
    pub protocols: Vec<HttpProtocol>,
    /// Maximum concurrent downstream connections; further connections wait in the backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How new connections are spread over the workers. Default `exact`.
    #[serde(default)]
    pub connection_balance: ConnectionBalance,
    /// Protection limits and timeouts.
    #[serde(default)]
    pub limits: Limits,
    /// How long a graceful drain waits for in-flight requests.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Trust `x-forwarded-for` from downstream (append to it) instead of replacing it.
    #[serde(default)]
    pub trust_forwarded_headers: bool,
    /// The listener's filter chain, run for every request unless a route overrides it.
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    /// Virtual hosts, matched by the request's authority.
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHost>,
}

fn default_protocols() -> Vec<HttpProtocol> {
    vec![HttpProtocol::Http1, HttpProtocol::Http2]
}
fn default_max_connections() -> usize {
    10_000
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(15)
}

/// How a listener spreads new connections over the workers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionBalance {
    /// A worker that accepts a connection while another worker serves fewer of
    /// the listener's connections hands it to that worker (Envoy's
    /// `exact_balance`), so a few long-lived connections (a mesh peer's HTTP/2
    /// connections, a load generator's keep-alive pool) never pile up on one worker.
    #[default]
    Exact,
    /// The kernel's `SO_REUSEPORT` hash of the 4-tuple alone decides.
    Kernel,
}

/// An HTTP protocol version.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum HttpProtocol {
    /// HTTP/1.1 (and 1.0).
    Http1,
    /// HTTP/2 (h2c prior knowledge in plaintext, ALPN `h2` over TLS).
    Http2,
}

/// Downstream TLS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Certificates; the SNI picks one by `server_names`, the first is the default.
    pub certificates: Vec<CertificateFiles>,
    /// PEM bundle of CAs that sign client certificates (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Refuse handshakes without a valid client certificate (requires `client_ca`).
    #[serde(default)]
    pub require_client_certificate: bool,
}

/// A certificate chain and its key, as PEM files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// SNI names served by this certificate (exact or `*.suffix`).
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// Downstream protection limits. The defaults follow Envoy's edge guidance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Maximum bytes of request headers (431 beyond).
    pub max_request_header_bytes: usize,
    /// Maximum number of request headers (431 beyond).
    pub max_request_headers: usize,
    /// Time allowed to receive the request headers.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Close a connection idle for this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Whole-request limit, downstream first byte to last byte of the response, unless
    /// the route sets its own timeout.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// HTTP/2: concurrent streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: per-stream flow-control window.
    pub h2_stream_window: u32,
    /// HTTP/2: connection flow-control window.
    pub h2_connection_window: u32,
    /// HTTP/2: close the connection after this many locally reset streams (rapid reset).
    pub h2_max_local_error_resets: usize,
    /// HTTP/2: max pending accept reset streams (rapid reset).
    pub h2_max_pending_accept_reset_streams: usize,
    /// Maximum bytes a filter chain may buffer for one body (413 / 500 beyond).
    pub max_buffered_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_header_bytes: 60 * 1024,
            max_request_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(300),
            h2_max_concurrent_streams: 100,
            h2_stream_window: 64 * 1024,
            h2_connection_window: 1024 * 1024,
            h2_max_local_error_resets: 1024,
            h2_max_pending_accept_reset_streams: 20,
            max_buffered_body_bytes: 1024 * 1024,
        }
    }
}

/// A virtual host: a set of routes for some authorities.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VirtualHost {
    /// Unique name within the listener.
    pub name: String,
    /// Authorities served: exact (`api.example.com`), suffix wildcard (`*.example.com`),
    /// prefix wildcard (`api.*`) or `*`. A port in the request authority is ignored
    /// unless the domain names one.
    pub domains: Vec<String>,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
    /// What its requests' filters read as `xds.virtual_host_metadata`.
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
}

/// A route: a match and an action.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Name used in metrics, logs and the `route_name` property. Default: `<vhost>/<index>`.
    #[serde(default)]
    pub name: Option<String>,
    /// What requests this route takes.
    #[serde(default, rename = "match")]
    pub matcher: RouteMatch,
    /// Forward to one or several (weighted) clusters.
    #[serde(default)]
    pub forward: Option<Forward>,
    /// Answer with a redirect.
    #[serde(default)]
    pub redirect: Option<Redirect>,
    /// Answer directly.
    #[serde(default)]
    pub direct_response: Option<DirectResponse>,
    /// Edits to the request headers sent upstream.
    #[serde(default)]
    pub request_headers: HeaderEdits,
    /// Edits to the response headers sent downstream.
    #[serde(default)]
    pub response_headers: HeaderEdits,
    /// How this route's filter chain relates to the listener's.
    #[serde(default)]
    pub filters: Option<RouteFilters>,
    /// What its requests' filters read as `xds.route_metadata`.
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
}

/// Request matching. All present conditions must hold.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Exact path (without the query).
    #[serde(default)]
    pub path: Option<String>,
    /// Path prefix. Default when no path condition is given: `/`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Path regex (must match the whole path).
    #[serde(default)]
    pub regex: Option<String>,
    /// Allowed methods; empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
    /// Query parameter conditions.
    #[serde(default)]
    pub query: Vec<QueryMatch>,
}

/// A condition on one request header. Exactly one of the value conditions, or none
/// (which means `present: true`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name, case-insensitive.
    pub name: String,
    /// The value equals this.
    #[serde(default)]
    pub exact: Option<String>,
    /// The whole value matches this regex.
    #[serde(default)]
    pub regex: Option<String>,
    /// `true`: the header is present; `false`: it is absent.
    #[serde(default)]
    pub present: Option<bool>,
}

/// A condition on one query parameter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct QueryMatch {
    /// Parameter name (after percent-decoding).
    pub name: String,
    /// The value equals this.
    #[serde(default)]
    pub exact: Option<String>,
    /// The whole value matches this regex.
    #[serde(default)]
    pub regex: Option<String>,
    /// `true`: the parameter is present; `false`: it is absent.
    #[serde(default)]
    pub present: Option<bool>,
}

/// Forwarding to upstream clusters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// One cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Weighted clusters (canary split); weights are relative.
    #[serde(default)]
    pub clusters: Vec<WeightedCluster>,
    /// Replace the matched prefix (or the whole exact path) with this.
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Replace the authority sent upstream.
    #[serde(default)]
    pub host_rewrite: Option<String>,
    /// Whole-request timeout (including retries). `0s` disables it for streaming routes.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Retry policy.
    #[serde(default)]
    pub retry: Option<RetryPolicy>,
}

/// One cluster of a weighted split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedCluster {
    /// Cluster name.
    pub name: String,
    /// Relative weight.
    pub weight: u32,
}

/// When and how often to retry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Conditions: `5xx`, `gateway-error` (502/503/504), `connect-failure`, `reset`,
    /// `retriable-status` (the codes in `statuses`).
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
    /// Extra status codes to retry on with `retriable-status`.
    #[serde(default)]
    pub statuses: Vec<u16>,
    /// Retries after the first attempt.
    #[serde(default = "default_retry_attempts")]
    pub attempts: u32,
    /// Timeout of each attempt.
    #[serde(default, with = "humantime_serde")]
    pub per_try_timeout: Option<Duration>,
    /// Exponential backoff with full jitter.
    #[serde(default)]
    pub backoff: Backoff,
    /// Retry requests that are neither idempotent nor body-less (default false).
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Largest request body kept for replay; larger bodies are not retried.
    #[serde(default = "default_retry_body")]
    pub max_body_bytes: usize,
    /// Retry budget: retries may add at most `ratio` of the requests, plus
    /// `min_per_second`, over a 10 s window (Linkerd's model).
    #[serde(default)]
    pub budget: RetryBudget,
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::ConnectFailure, RetryOn::GatewayError, RetryOn::Reset]
}
fn default_retry_attempts() -> u32 {
    2
}
fn default_retry_body() -> usize {
    64 * 1024
}

/// A retry condition.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504.
    GatewayError,
    /// The upstream connection could not be made.
    ConnectFailure,
    /// The upstream reset the connection or stream before a response.
    Reset,
    /// One of `statuses`.
    RetriableStatus,
}

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// First interval.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// Largest interval.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base: Duration::from_millis(25), max: Duration::from_millis(250) }
    }
}

/// A retry budget.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudget {
    /// Ratio of retries to requests.
    pub ratio: f64,
    /// Retries always allowed per second.
    pub min_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget { ratio: 0.2, min_per_second: 10 }
    }
}

/// A redirect answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// Status: 301, 302, 303, 307 or 308 (default 301).
    #[serde(default = "default_redirect_code")]
    pub code: u16,
    /// New scheme.
    #[serde(default)]
    pub scheme: Option<String>,
    /// New host (authority).
    #[serde(default)]
    pub host: Option<String>,
    /// New path (the query is kept unless `strip_query`).
    #[serde(default)]
    pub path: Option<String>,
    /// Replace the matched prefix with this.
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Drop the query string.
    #[serde(default)]
    pub strip_query: bool,
}

fn default_redirect_code() -> u16 {
    301
}

/// A direct answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    /// HTTP status.
    pub status: u16,
    /// Body (UTF-8).
    #[serde(default)]
    pub body: String,
    /// Content type of the body.
    #[serde(default)]
    pub content_type: Option<String>,
}

/// Header edits, applied in the order remove, set, add.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    /// Append these headers.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Set these headers, replacing any value.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Remove these headers.
    #[serde(default)]
    pub remove: Vec<String>,
}

impl HeaderEdits {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }
}

/// A route's filter chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteFilters {
    /// `extend` (listener chain, then these), `replace` (only these) or `disable` (none).
    #[serde(default)]
    pub mode: RouteFilterMode,
    /// The filters.
    #[serde(default)]
    pub chain: Vec<FilterSpec>,
}

/// How a route's chain combines with the listener's.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RouteFilterMode {
    /// The listener's filters, then the route's.
    #[default]
    Extend,
    /// Only the route's filters.
    Replace,
    /// No filters at all.
    Disable,
}

/// An upstream cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Unique name.
    pub name: String,
    /// What the filters of requests sent to it read as `xds.cluster_metadata`.
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
    /// Endpoints: `ip:port` or `dns-name:port` (re-resolved every `dns_refresh`).
    pub endpoints: Vec<String>,
    /// Upstream protocol (gRPC needs `http2`).
    #[serde(default = "default_upstream_protocol")]
    pub protocol: HttpProtocol,
    /// Time to establish a connection (TCP and TLS).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// DNS re-resolution interval for name endpoints.
    #[serde(default = "default_dns_refresh", with = "humantime_serde")]
    pub dns_refresh: Duration,
    /// Load-balancing policy.
    #[serde(default)]
    pub lb: LbPolicy,
    /// Connection pool.
    #[serde(default)]
    pub pool: Pool,
    /// Circuit breaker thresholds (fast 503 beyond).
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    /// Active health checking.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Passive outlier detection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Upstream TLS.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
}

fn default_upstream_protocol() -> HttpProtocol {
    HttpProtocol::Http1
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_dns_refresh() -> Duration {
    Duration::from_secs(5)
}

/// Load-balancing policy. Written `round_robin`, `least_request`, `random` or
/// `{ ring_hash: { header: x-user } }`.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Round robin over healthy endpoints.
    #[default]
    RoundRobin,
    /// Power of two choices on active requests.
    LeastRequest,
    /// Uniformly random.
    Random,
    /// Consistent hashing on a request attribute.
    RingHash(HashOn),
}

impl<'de> Deserialize<'de> for LbPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::enums::one_of(
            d,
            "a load-balancing policy: `round_robin`, `least_request`, `random` or `{ ring_hash: {...} }`",
            |name| match name {
                "round_robin" => Some(LbPolicy::RoundRobin),
                "least_request" => Some(LbPolicy::LeastRequest),
                "random" => Some(LbPolicy::Random),
                _ => None,
            },
            |key, map| match key {
                "ring_hash" => Some(serde_yaml_ng::from_value(map).map(LbPolicy::RingHash)),
                _ => None,
            },
        )
    }
}

/// What a ring hash hashes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HashOn {
    /// A request header's value.
    #[serde(default)]
    pub header: Option<String>,
    /// A cookie's value.
    #[serde(default)]
    pub cookie: Option<String>,
    /// The downstream source IP.
    #[serde(default)]
    pub source_ip: bool,
}

/// Upstream connection pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    /// Idle connections kept per endpoint and worker. The default matches
    /// the circuit breaker's `max_connections`, as Envoy keeps every
    /// connection until its idle timeout: a lower cap closes connections a
    /// burst opened only to reopen them on the next burst.
    pub max_idle_per_endpoint: usize,
    /// Close idle connections after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Pool { max_idle_per_endpoint: 1024, idle_timeout: Duration::from_secs(60) }
    }
}

/// Circuit-breaker thresholds for a cluster, across all workers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreaker {
    /// Open upstream connections.
    pub max_connections: usize,
    /// Requests waiting for a connection.
    pub max_pending_requests: usize,
    /// Requests in flight.
    pub max_requests: usize,
    /// Retries in flight.
    pub max_retries: usize,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// Active HTTP health checking.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Path to GET.
    #[serde(default = "default_hc_path")]
    pub path: String,
    /// Authority to send; default: the endpoint address.
    #[serde(default)]
    pub host: Option<String>,
    /// Interval between checks.
    #[serde(default = "default_hc_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Timeout of one check.
    #[serde(default = "default_hc_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Successes to mark an endpoint healthy.
    #[serde(default = "one")]
    pub healthy_threshold: u32,
    /// Failures to mark an endpoint unhealthy.
    #[serde(default = "three")]
    pub unhealthy_threshold: u32,
    /// Statuses counted as healthy; default 200–299.
    #[serde(default)]
    pub expected_statuses: Vec<u16>,
}

fn default_hc_path() -> String {
    "/".to_owned()
}
fn default_hc_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_hc_timeout() -> Duration {
    Duration::from_secs(1)
}
fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}

/// Passive outlier detection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses that eject an endpoint (0 disables).
    pub consecutive_5xx: u32,
    /// Consecutive gateway errors / connect failures that eject (0 disables).
    pub consecutive_gateway_errors: u32,
    /// First ejection time; each further ejection of the same endpoint adds one more.
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// Longest ejection.
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// At most this percentage of the endpoints is ejected at once.
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// Upstream TLS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Server name sent in SNI and verified; default: the endpoint's host.
    #[serde(default)]
    pub sni: Option<String>,
    /// PEM CA bundle that signs the upstream's certificate (required).
    pub ca: PathBuf,
    /// Client certificate for mTLS.
    #[serde(default)]
    pub client_certificate: Option<CertificateFiles>,
}

fn default_hc_statuses() -> std::ops::RangeInclusive<u16> {
    200..=299
}

impl HealthCheck {
    /// Whether `status` counts as healthy.
    pub fn is_expected(&self, status: u16) -> bool {
        if self.expected_statuses.is_empty() {
            default_hc_statuses().contains(&status)
        } else {
            self.expected_statuses.contains(&status)
        }
    }
}
