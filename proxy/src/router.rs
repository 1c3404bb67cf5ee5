//! Routing tables compiled from the config: virtual hosts by authority, then
//! routes by path, method, headers and query, first match wins.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;
use sluice_config::{
    HeaderEdits, HeaderMatch, Metadata, QueryMatch, Redirect, RetryOn, RetryPolicy, Route, RouteFilterMode,
    VirtualHost, compile_regex,
};
use sluice_filter::{FilterFactory, RouteFacts};

use crate::cluster::ClusterState;
use crate::metrics::RouteMetrics;
use crate::retry::RetryBudget;

/// A compiled filter chain.
pub type Chain = Arc<[Arc<dyn FilterFactory>]>;

/// A listener's routing table.
pub struct Router {
    vhosts: Vec<CompiledVhost>,
    exact: HashMap<String, usize>,
    /// `*.suffix` patterns as (".suffix", index), longest first.
    suffix: Vec<(String, usize)>,
    /// `prefix.*` patterns as ("prefix.", index), longest first.
    prefix: Vec<(String, usize)>,
    catch_all: Option<usize>,
    /// What a request no route matches goes to: a 404 (`no_route`) after the
    /// listener's chain, which runs on it as Envoy's connection manager runs
    /// its filters before its router finds no route. Also where a filter's
    /// header edit that leaves no route matching leads.
    no_route: Arc<CompiledRoute>,
}

struct CompiledVhost {
    routes: Vec<Arc<CompiledRoute>>,
}

enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

enum ValueCond {
    Exact(String),
    Regex(Regex),
    Present(bool),
}

/// A compiled route.
pub struct CompiledRoute {
    /// Name (config name, or `<vhost>/<index>`).
    pub name: Arc<str>,
    /// What its requests' filters read of it (name, virtual host, metadata).
    pub facts: Arc<RouteFacts>,
    path: PathMatch,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, ValueCond)>,
    query: Vec<(String, ValueCond)>,
    /// What to do.
    pub action: RouteAction,
    /// Request header edits.
    pub request_edits: CompiledEdits,
    /// Response header edits.
    pub response_edits: CompiledEdits,
    /// The filter chain for this route (listener chain combined per mode).
    pub chain: Chain,
    /// Metrics when no cluster is involved (redirects, direct responses);
    /// `None` for [`Router::no_route`], whose 404s count as before any route.
    pub local_metrics: Option<Arc<RouteMetrics>>,
}

/// What a route does.
pub enum RouteAction {
    /// Forward upstream.
    Forward(Forward),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer directly.
    Direct {
        /// Status.
        status: StatusCode,
        /// Body.
        body: bytes::Bytes,
        /// Content type.
        content_type: Option<HeaderValue>,
    },
    /// No route matched: 404 `no_route` (only [`Router::no_route`] has it).
    NoRoute,
}

/// A compiled forward action.
pub struct Forward {
    /// Target clusters with cumulative weights.
    pub targets: Vec<Target>,
    total_weight: u64,
    /// Prefix rewrite (with the matched prefix or exact path).
    pub prefix_rewrite: Option<String>,
    /// Host rewrite.
    pub host_rewrite: Option<http::uri::Authority>,
    /// Whole-request timeout; `None` disables.
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub retry: Option<Arc<CompiledRetry>>,
}

/// One target cluster.
pub struct Target {
    /// The cluster.
    pub cluster: Arc<ClusterState>,
    cumulative: u64,
    /// Pre-resolved metrics for (listener, route, cluster).
    pub metrics: Arc<RouteMetrics>,
}

/// A compiled retry policy.
pub struct CompiledRetry {
    /// The policy.
    pub policy: RetryPolicy,
    /// Budget shared by every request of the route.
    pub budget: RetryBudget,
}

impl CompiledRetry {
    /// Whether a response status should be retried.
    pub fn retry_status(&self, status: u16) -> bool {
        self.policy.on.iter().any(|on| match on {
            RetryOn::FiveXx => status >= 500,
            RetryOn::GatewayError => matches!(status, 502..=504),
            RetryOn::RetriableStatus => self.policy.statuses.contains(&status),
            RetryOn::ConnectFailure | RetryOn::Reset => false,
        })
    }

    /// Whether a connect failure should be retried.
    pub fn retry_connect_failure(&self) -> bool {
        self.policy
            .on
            .iter()
            .any(|on| matches!(on, RetryOn::ConnectFailure | RetryOn::FiveXx | RetryOn::GatewayError))
    }

    /// Whether a reset (or per-try timeout) should be retried.
    pub fn retry_reset(&self) -> bool {
        self.policy.on.iter().any(|on| matches!(on, RetryOn::Reset | RetryOn::FiveXx | RetryOn::GatewayError))
    }
}

impl Forward {
    /// Picks a target by weight.
    pub fn pick(&self) -> &Target {
        if self.targets.len() == 1 {
            return &self.targets[0];
        }
        let r = fastrand::u64(..self.total_weight.max(1));
        self.targets.iter().find(|t| r < t.cumulative).unwrap_or(&self.targets[0])
    }
}

/// Compiled header edits.
#[derive(Default)]
pub struct CompiledEdits {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl CompiledEdits {
    fn compile(e: &HeaderEdits) -> Self {
        let pairs = |m: &std::collections::BTreeMap<String, String>| {
            m.iter()
                .filter_map(|(k, v)| {
                    Some((HeaderName::from_bytes(k.as_bytes()).ok()?, HeaderValue::from_str(v).ok()?))
                })
                .collect()
        };
        CompiledEdits {
            remove: e.remove.iter().filter_map(|k| HeaderName::from_bytes(k.as_bytes()).ok()).collect(),
            set: pairs(&e.set),
            add: pairs(&e.add),
        }
    }

    /// Applies the edits: remove, set, add.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for k in &self.remove {
            headers.remove(k);
        }
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            headers.append(k.clone(), v.clone());
        }
    }

    /// The names whose fields the edits replace or remove.
    pub fn replaced(&self) -> impl Iterator<Item = &HeaderName> + Clone {
        self.remove.iter().chain(self.set.iter().map(|(k, _)| k))
    }

    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

/// What the router needs to know to compile a route.
pub struct RouteContext<'a> {
    /// The listener name, for metrics.
    pub listener: &'a str,
    /// Clusters by name.
    pub clusters: &'a HashMap<String, Arc<ClusterState>>,
    /// The listener's chain.
    pub listener_chain: &'a Chain,
    /// Loaded route chains, by `(vhost index, route index)`.
    pub route_chains: &'a HashMap<(usize, usize), Chain>,
    /// Metrics families.
    pub metrics: &'a crate::metrics::Metrics,
    /// Listener-wide request timeout, for routes without their own.
    pub default_timeout: Duration,
}

impl Router {
    /// Compiles a listener's virtual hosts. The config was validated, so every
    /// regex compiles and every cluster exists; anything else is skipped.
    pub fn compile(vhosts: &[VirtualHost], cx: &RouteContext<'_>) -> Router {
        let mut r = Router {
            vhosts: Vec::new(),
            exact: HashMap::new(),
            suffix: Vec::new(),
            prefix: Vec::new(),
            catch_all: None,
            no_route: Arc::new(CompiledRoute {
                name: Arc::from(""),
                facts: Arc::default(),
                path: PathMatch::Prefix(String::new()),
                methods: Vec::new(),
                headers: Vec::new(),
                query: Vec::new(),
                action: RouteAction::NoRoute,
                request_edits: CompiledEdits::default(),
                response_edits: CompiledEdits::default(),
                chain: cx.listener_chain.clone(),
                local_metrics: None,
            }),
        };
        for (vi, vh) in vhosts.iter().enumerate() {
            let vhost = (
                Arc::from(vh.name.as_str()),
                (!vh.metadata.is_empty()).then(|| Arc::new(vh.metadata.clone())),
            );
            let routes = vh
                .routes
                .iter()
                .enumerate()
                .filter_map(|(ri, route)| compile_route(vh, &vhost, vi, ri, route, cx).map(Arc::new))
                .collect();
            r.vhosts.push(CompiledVhost { routes });
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                if d == "*" {
                    r.catch_all = Some(vi);
                } else if let Some(s) = d.strip_prefix('*') {
                    r.suffix.push((s.to_owned(), vi));
                } else if let Some(p) = d.strip_suffix('*') {
                    r.prefix.push((p.to_owned(), vi));
                } else {
                    r.exact.insert(d, vi);
                }
            }
        }
        r.suffix.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        r.prefix.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        r
    }

    /// Finds the route for a request. `authority` is lowercase-insensitive.
    pub fn route(
        &self,
        authority: &str,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<&Arc<CompiledRoute>> {
        let vi = self.vhost(authority)?;
        self.vhosts[vi].routes.iter().find(|r| r.matches(method, path, query, headers))
    }

    /// The route of requests no route matches (see the field): its action is
    /// [`RouteAction::NoRoute`], its chain the listener's.
    pub fn no_route(&self) -> &Arc<CompiledRoute> {
        &self.no_route
    }

    fn vhost(&self, authority: &str) -> Option<usize> {
        if self.exact.is_empty() && self.suffix.is_empty() && self.prefix.is_empty() {
            return self.catch_all;
        }
        let lower;
        let authority = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = authority.to_ascii_lowercase();
            lower.as_str()
        } else {
            authority
        };
        let host = strip_port(authority);
        if let Some(i) = self.exact.get(authority).or_else(|| self.exact.get(host)) {
            return Some(*i);
        }
        for (suffix, i) in &self.suffix {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return Some(*i);
            }
        }
        for (prefix, i) in &self.prefix {
            if host.len() > prefix.len() && host.starts_with(prefix.as_str()) {
                return Some(*i);
            }
        }
        self.catch_all
    }
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

impl CompiledRoute {
    /// Whether this is [`Router::no_route`]: no route matched.
    pub fn is_no_route(&self) -> bool {
        matches!(self.action, RouteAction::NoRoute)
    }

    fn matches(&self, method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(re) => re.is_match(path),
        };
        if !path_ok || (!self.methods.is_empty() && !self.methods.contains(method)) {
            return false;
        }
        for (name, cond) in &self.headers {
            let mut values = headers.get_all(name).iter();
            let ok = match cond {
                ValueCond::Present(want) => values.next().is_some() == *want,
                ValueCond::Exact(v) => values.any(|h| h.as_bytes() == v.as_bytes()),
                ValueCond::Regex(re) => values.any(|h| h.to_str().is_ok_and(|s| re.is_match(s))),
            };
            if !ok {
                return false;
            }
        }
        if !self.query.is_empty() {
            let q = query.unwrap_or("");
            for (name, cond) in &self.query {
                let mut values = query_values(q, name);
                let ok = match cond {
                    ValueCond::Present(want) => values.next().is_some() == *want,
                    ValueCond::Exact(v) => values.any(|x| x == *v),
                    ValueCond::Regex(re) => values.any(|x| re.is_match(&x)),
                };
                if !ok {
                    return false;
                }
            }
        }
        true
    }

    /// The prefix or exact path this route matched, for prefix rewrites.
    pub fn matched_prefix(&self) -> Option<&str> {
        match &self.path {
            PathMatch::Prefix(p) | PathMatch::Exact(p) => Some(p),
            PathMatch::Regex(_) => None,
        }
    }
}

/// Percent-decoded values of a query parameter.
pub fn query_values<'a>(query: &'a str, name: &'a str) -> impl Iterator<Item = String> + 'a {
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode_component(k);
        (k == name).then(|| decode_component(v))
    })
}

fn decode_component(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus).decode_utf8_lossy().into_owned()
}

fn value_cond(exact: &Option<String>, regex: &Option<String>, present: Option<bool>) -> Option<ValueCond> {
    Some(if let Some(e) = exact {
        ValueCond::Exact(e.clone())
    } else if let Some(r) = regex {
        ValueCond::Regex(compile_regex(r).ok()?)
    } else {
        ValueCond::Present(present.unwrap_or(true))
    })
}

fn compile_route(
    vh: &VirtualHost,
    vhost: &(Arc<str>, Option<Arc<Metadata>>),
    vi: usize,
    ri: usize,
    route: &Route,
    cx: &RouteContext<'_>,
) -> Option<CompiledRoute> {
    let m = &route.matcher;
    let name: Arc<str> = route.name.clone().unwrap_or_else(|| format!("{}/{ri}", vh.name)).into();
    let path = if let Some(p) = &m.path {
        PathMatch::Exact(p.clone())
    } else if let Some(re) = &m.regex {
        PathMatch::Regex(compile_regex(re).ok()?)
    } else {
        PathMatch::Prefix(m.prefix.clone().unwrap_or_else(|| "/".to_owned()))
    };
    let headers = m
        .headers
        .iter()
        .map(|h: &HeaderMatch| {
            Some((
                HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                value_cond(&h.exact, &h.regex, h.present)?,
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    let query = m
        .query
        .iter()
        .map(|q: &QueryMatch| Some((q.name.clone(), value_cond(&q.exact, &q.regex, q.present)?)))
        .collect::<Option<Vec<_>>>()?;
    let methods = m.methods.iter().filter_map(|s| Method::from_bytes(s.as_bytes()).ok()).collect();
    let action = if let Some(f) = &route.forward {
        let mut targets = Vec::new();
        let mut cumulative = 0u64;
        let list: Vec<(String, u32)> = match &f.cluster {
            Some(c) => vec![(c.clone(), 1)],
            None => f.clusters.iter().map(|w| (w.name.clone(), w.weight)).collect(),
        };
        for (cname, weight) in list {
            let cluster = cx.clusters.get(&cname)?.clone();
            cumulative += u64::from(weight);
            let metrics = cx.metrics.route_handles(cx.listener, &name, &cname);
            targets.push(Target { cluster, cumulative, metrics });
        }
        let timeout = match f.timeout {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => Some(cx.default_timeout),
        };
        RouteAction::Forward(Forward {
            targets,
            total_weight: cumulative,
            prefix_rewrite: f.prefix_rewrite.clone(),
            host_rewrite: f.host_rewrite.as_deref().and_then(|h| h.parse().ok()),
            timeout,
            retry: f
                .retry
                .as_ref()
                .map(|p| Arc::new(CompiledRetry { policy: p.clone(), budget: RetryBudget::new(&p.budget) })),
        })
    } else if let Some(r) = &route.redirect {
        RouteAction::Redirect(r.clone())
    } else {
        let d = route.direct_response.as_ref()?;
        RouteAction::Direct {
            status: StatusCode::from_u16(d.status).ok()?,
            body: bytes::Bytes::from(d.body.clone()),
            content_type: d.content_type.as_deref().and_then(|c| HeaderValue::from_str(c).ok()),
        }
    };
    let chain = match &route.filters {
        None => cx.listener_chain.clone(),
        Some(rf) => match rf.mode {
            RouteFilterMode::Disable => Arc::from(Vec::new()),
            RouteFilterMode::Replace => {
                cx.route_chains.get(&(vi, ri)).cloned().unwrap_or_else(|| Arc::from(Vec::new()))
            }
            RouteFilterMode::Extend => {
                let mut v: Vec<Arc<dyn FilterFactory>> = cx.listener_chain.iter().cloned().collect();
                if let Some(extra) = cx.route_chains.get(&(vi, ri)) {
                    v.extend(extra.iter().cloned());
                }
                Arc::from(v)
            }
        },
    };
    Some(CompiledRoute {
        local_metrics: Some(cx.metrics.route_handles(cx.listener, &name, "")),
        name: name.clone(),
        facts: Arc::new(RouteFacts {
            name,
            virtual_host: vhost.0.clone(),
            metadata: (!route.metadata.is_empty()).then(|| route.metadata.clone()),
            virtual_host_metadata: vhost.1.clone(),
        }),
        path,
        methods,
        headers,
        query,
        action,
        request_edits: CompiledEdits::compile(&route.request_headers),
        response_edits: CompiledEdits::compile(&route.response_headers),
        chain,
    })
}
