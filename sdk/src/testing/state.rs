//! The simulated host's state and its ABI-level host calls. It follows Envoy's
//! observed behaviour where hosts differ (see the ABI reference): maps and buffers
//! are only available in their callbacks (reads elsewhere see nothing, writes are
//! rejected with BAD_ARGUMENT), `set_buffer_bytes` only prepends, replaces all or
//! appends, replacing a header moves it to the end, counters reject non-positive
//! deltas, and stream actions (continue, close, local response) take effect after
//! the callback returns.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use sluice_abi::{BufferType, GrpcStatus, LogLevel, MapType, MetricType, Status, StreamType, pairs};

use super::types::{GrpcCallout, HttpCallout, LocalResponse, LogEntry, Message, TestResponse};
use crate::sys::native::NativeHost;

type Raw = Result<(), u32>;

const NOT_FOUND: u32 = Status::NotFound as u32;
const BAD_ARGUMENT: u32 = Status::BadArgument as u32;
const CAS_MISMATCH: u32 = Status::CasMismatch as u32;
const EMPTY: u32 = Status::Empty as u32;

/// Where a stream is in its lifecycle: the next callback to run (or, when
/// `blocked`, the one that paused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    RequestHeaders,
    RequestBody(usize),
    RequestTrailers,
    Upstream,
    ResponseHeaders,
    ResponseBody(usize),
    ResponseTrailers,
    Log,
    Done,
}

impl Stage {
    pub(crate) fn is_request(self) -> bool {
        self < Stage::Upstream
    }
}

/// What the host is doing right now (which callback runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Activity {
    Idle,
    VmStart,
    Configure,
    Stream(Stage),
    Log,
    HttpCallResponse { token: u32, response: Option<TestResponse> },
    GrpcReceive { message: Vec<u8> },
    GrpcClose,
    Foreign { args: Vec<u8> },
    Root,
}

/// The simulated HTTP stream.
#[derive(Debug, Default)]
pub(crate) struct StreamState {
    pub(crate) req_headers: Vec<(String, String)>,
    pub(crate) req_chunks: Vec<Vec<u8>>,
    pub(crate) req_trailers: Vec<(String, String)>,
    pub(crate) req_buffer: Vec<u8>,
    pub(crate) req_forwarded: Vec<u8>,
    pub(crate) upstream: TestResponse,
    pub(crate) resp_headers: Vec<(String, String)>,
    pub(crate) resp_chunks: Vec<Vec<u8>>,
    pub(crate) resp_trailers: Vec<(String, String)>,
    pub(crate) resp_buffer: Vec<u8>,
    pub(crate) resp_forwarded: Vec<u8>,
    pub(crate) stage: Option<Stage>,
    pub(crate) blocked: Option<Stage>,
    pub(crate) local: Option<LocalResponse>,
    pub(crate) local_new: bool,
    pub(crate) local_in_response: bool,
    pub(crate) upstream_request: Option<Message>,
    pub(crate) downstream: Option<Message>,
    pub(crate) reset: bool,
    pub(crate) deleted: bool,
    pub(crate) properties: HashMap<Vec<u8>, Vec<u8>>,
}

/// Something a host call asked for that happens after the callback returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deferred {
    Continue(u32, StreamType),
    Close(u32, StreamType),
}

#[derive(Debug, Clone)]
pub(crate) struct MetricState {
    pub(crate) name: String,
    pub(crate) ty: MetricType,
    pub(crate) value: i64,
    pub(crate) records: Vec<u64>,
}

#[derive(Debug)]
pub(crate) struct QueueState {
    pub(crate) vm_id: String,
    pub(crate) name: String,
    pub(crate) owner: u64,
    pub(crate) items: VecDeque<Vec<u8>>,
}

/// Shared data and queues: process-wide on a real host, so several test hosts can
/// share one (`TestHostBuilder::share_with`).
#[derive(Debug, Default)]
pub(crate) struct SharedStore {
    pub(crate) data: BTreeMap<Vec<u8>, (Vec<u8>, u32)>,
    pub(crate) next_cas: u32,
    pub(crate) queues: Vec<QueueState>,
    /// Queue notifications still to deliver: (owning host, queue id).
    pub(crate) ready: Vec<(u64, u32)>,
}

pub(crate) type ForeignFn = Box<dyn FnMut(&[u8]) -> Result<Vec<u8>, u32>>;

/// The whole simulated host.
pub(crate) struct HostState {
    pub(crate) host_id: u64,
    pub(crate) vm_id: String,
    pub(crate) root_id: u32,
    pub(crate) now_nanos: u64,
    pub(crate) log_level: LogLevel,
    pub(crate) logs: Vec<LogEntry>,
    pub(crate) vm_config: Vec<u8>,
    pub(crate) plugin_config: Vec<u8>,
    pub(crate) activity: Activity,
    pub(crate) effective: u32,
    pub(crate) streams: HashMap<u32, StreamState>,
    pub(crate) tick_period: Option<Duration>,
    pub(crate) next_tick_nanos: u64,
    pub(crate) next_token: u32,
    pub(crate) http_calls: BTreeMap<u32, HttpCallout>,
    pub(crate) grpc_calls: BTreeMap<u32, GrpcCallout>,
    pub(crate) call_status: (u32, String),
    pub(crate) deferred: Vec<Deferred>,
    pub(crate) shared: Rc<RefCell<SharedStore>>,
    pub(crate) metrics: Vec<MetricState>,
    pub(crate) properties: HashMap<Vec<u8>, Vec<u8>>,
    pub(crate) foreign: HashMap<String, ForeignFn>,
    pub(crate) done_called: bool,
}

impl HostState {
    pub(crate) fn new(host_id: u64, shared: Rc<RefCell<SharedStore>>) -> HostState {
        HostState {
            host_id,
            vm_id: String::new(),
            root_id: 1,
            // 2024-01-01T00:00:00Z: a fixed, readable start.
            now_nanos: 1_704_067_200_000_000_000,
            log_level: LogLevel::Trace,
            logs: Vec::new(),
            vm_config: Vec::new(),
            plugin_config: Vec::new(),
            activity: Activity::Idle,
            effective: 0,
            streams: HashMap::new(),
            tick_period: None,
            next_tick_nanos: 0,
            next_token: 1,
            http_calls: BTreeMap::new(),
            grpc_calls: BTreeMap::new(),
            call_status: (0, String::new()),
            deferred: Vec::new(),
            shared,
            metrics: Vec::new(),
            properties: HashMap::new(),
            foreign: HashMap::new(),
            done_called: false,
        }
    }

    /// Records a line from the host itself (shown with the guest's logs).
    pub(crate) fn host_log(&mut self, level: LogLevel, message: String) {
        self.logs.push(LogEntry { level, message: format!("[test host] {message}") });
    }

    fn stream(&self) -> Option<&StreamState> {
        self.streams.get(&self.effective)
    }

    fn stream_mut(&mut self) -> Option<&mut StreamState> {
        self.streams.get_mut(&self.effective)
    }

    /// The stage the current stream is "in" for host calls: the callback running for
    /// it, or the one it is paused in.
    fn window(&self) -> Option<Stage> {
        let s = self.stream()?;
        match self.activity {
            Activity::Stream(stage) => Some(stage),
            _ => s.blocked,
        }
    }

    fn in_log(&self) -> bool {
        self.activity == Activity::Log && self.stream().is_some()
    }

    /// The map a host call addresses: `Ok(Some(map))` when readable, plus whether it
    /// is writable.
    fn map(&self, map: u32) -> Result<(Option<&Vec<(String, String)>>, bool), u32> {
        let ty = MapType::from_u32(map).ok_or(BAD_ARGUMENT)?;
        let window = self.window();
        let log = self.in_log();
        let s = self.stream();
        Ok(match ty {
            MapType::HttpRequestHeaders => match (s, window) {
                (Some(s), Some(Stage::RequestHeaders)) => (Some(&s.req_headers), true),
                (Some(s), _) if log => (Some(&s.req_headers), false),
                _ => (None, false),
            },
            MapType::HttpRequestTrailers => match (s, window) {
                (Some(s), Some(Stage::RequestTrailers)) => (Some(&s.req_trailers), true),
                (Some(s), _) if log => (Some(&s.req_trailers), false),
                _ => (None, false),
            },
            MapType::HttpResponseHeaders => match (s, window) {
                (Some(s), Some(Stage::ResponseHeaders)) => (Some(&s.resp_headers), true),
                (Some(s), _) if log => (Some(&s.resp_headers), false),
                _ => (None, false),
            },
            MapType::HttpResponseTrailers => match (s, window) {
                (Some(s), Some(Stage::ResponseTrailers)) => (Some(&s.resp_trailers), true),
                (Some(s), _) if log => (Some(&s.resp_trailers), false),
                _ => (None, false),
            },
            _ => (None, false),
        })
    }

    fn map_mut(&mut self, map: u32) -> Result<&mut Vec<(String, String)>, u32> {
        let (_, writable) = self.map(map)?;
        if !writable {
            let name = MapType::from_u32(map).map_or("?".to_string(), |m| format!("{m:?}"));
            let stage = self.window();
            self.host_log(
                LogLevel::Debug,
                format!("rejected a write to {name} outside its callback (stage {stage:?})"),
            );
            return Err(BAD_ARGUMENT);
        }
        let s = self.stream_mut().ok_or(BAD_ARGUMENT)?;
        Ok(match MapType::from_u32(map) {
            Some(MapType::HttpRequestHeaders) => &mut s.req_headers,
            Some(MapType::HttpRequestTrailers) => &mut s.req_trailers,
            Some(MapType::HttpResponseHeaders) => &mut s.resp_headers,
            _ => &mut s.resp_trailers,
        })
    }

    /// The entries of a readable map, with callout maps resolved.
    fn read_map(&self, map: u32) -> Result<Vec<(String, String)>, u32> {
        match (MapType::from_u32(map), &self.activity) {
            (
                Some(MapType::HttpCallResponseHeaders),
                Activity::HttpCallResponse { response: Some(r), .. },
            ) => Ok(r.head()),
            (
                Some(MapType::HttpCallResponseTrailers),
                Activity::HttpCallResponse { response: Some(r), .. },
            ) => Ok(r.trailers.clone()),
            _ => Ok(self.map(map)?.0.cloned().unwrap_or_default()),
        }
    }

    fn buffer(&self, ty: u32) -> Result<Vec<u8>, u32> {
        let ty = BufferType::from_u32(ty).ok_or(BAD_ARGUMENT)?;
        let window = self.window();
        let s = self.stream();
        match (ty, &self.activity) {
            (BufferType::VmConfiguration, Activity::VmStart) => Ok(self.vm_config.clone()),
            (BufferType::PluginConfiguration, Activity::Configure) => Ok(self.plugin_config.clone()),
            (BufferType::HttpCallResponseBody, Activity::HttpCallResponse { response: Some(r), .. }) => {
                Ok(r.joined_body())
            }
            (BufferType::GrpcReceiveBuffer, Activity::GrpcReceive { message }) => Ok(message.clone()),
            (BufferType::CallData, Activity::Foreign { args }) => Ok(args.clone()),
            (BufferType::DownstreamData, _) => s.map(|s| s.req_buffer.clone()).ok_or(NOT_FOUND),
            (BufferType::UpstreamData, _) => s.map(|s| s.resp_buffer.clone()).ok_or(NOT_FOUND),
            (BufferType::HttpRequestBody, _) => match (s, window) {
                (Some(s), Some(Stage::RequestBody(_) | Stage::RequestTrailers)) => Ok(s.req_buffer.clone()),
                _ => Err(NOT_FOUND),
            },
            (BufferType::HttpResponseBody, _) => match (s, window) {
                (Some(s), Some(Stage::ResponseBody(_) | Stage::ResponseTrailers)) => {
                    Ok(s.resp_buffer.clone())
                }
                _ => Err(NOT_FOUND),
            },
            _ => Err(NOT_FOUND),
        }
    }

    fn metric(&mut self, id: u32) -> Result<&mut MetricState, u32> {
        let index = id.checked_sub(1).ok_or(NOT_FOUND)? as usize;
        self.metrics.get_mut(index).ok_or(NOT_FOUND)
    }

    fn next_token(&mut self) -> u32 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn property(&self, path: &[u8]) -> Option<Vec<u8>> {
        // Tolerate one trailing NUL.
        let path = path.strip_suffix(&[0]).unwrap_or(path);
        if let Some(s) = self.stream() {
            if let Some(v) = s.properties.get(path) {
                return Some(v.clone());
            }
            let header = |name: &str| {
                s.req_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone().into_bytes())
            };
            let derived = match path {
                b"request\0path" => header(":path"),
                b"request\0method" => header(":method"),
                b"request\0host" => header(":authority"),
                b"request\0scheme" => header(":scheme"),
                b"request\0id" => header("x-request-id"),
                b"response\0code" => s
                    .resp_headers
                    .iter()
                    .find(|(k, _)| k == ":status")
                    .and_then(|(_, v)| v.parse::<i64>().ok())
                    .map(|c| c.to_le_bytes().to_vec()),
                _ => None,
            };
            if derived.is_some() {
                return derived;
            }
        }
        self.properties.get(path).cloned()
    }
}

fn lower(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_lowercase()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn decode(data: &[u8]) -> Result<Vec<(String, String)>, u32> {
    let p = pairs::decode(data).map_err(|_| BAD_ARGUMENT)?;
    Ok(p.into_iter().map(|(k, v)| (text(k), text(v))).collect())
}

fn clamp(data: &[u8], start: usize, max: usize) -> Vec<u8> {
    let len = data.len() as u64;
    let start = (start as u64).min(len);
    let end = start.saturating_add(max as u64).min(len);
    data[start as usize..end as usize].to_vec()
}

fn some_if_nonempty(v: Vec<u8>) -> Option<Vec<u8>> {
    if v.is_empty() { None } else { Some(v) }
}

impl NativeHost for HostState {
    fn log(&mut self, level: u32, msg: &str) -> Raw {
        let level = LogLevel::from_u32(level).ok_or(BAD_ARGUMENT)?;
        if level.as_u32() >= self.log_level.as_u32() {
            self.logs.push(LogEntry { level, message: msg.to_string() });
        }
        Ok(())
    }

    fn get_log_level(&mut self) -> Result<u32, u32> {
        Ok(self.log_level.as_u32())
    }

    fn get_current_time_nanos(&mut self) -> Result<u64, u32> {
        Ok(self.now_nanos)
    }

    fn set_tick_period_ms(&mut self, ms: u32) -> Raw {
        if ms == 0 {
            self.tick_period = None;
        } else {
            let period = Duration::from_millis(u64::from(ms));
            self.tick_period = Some(period);
            self.next_tick_nanos = self.now_nanos + period.as_nanos() as u64;
        }
        Ok(())
    }

    fn set_effective_context(&mut self, id: u32) -> Raw {
        if id == self.root_id || self.streams.get(&id).is_some_and(|s| !s.deleted) {
            self.effective = id;
            Ok(())
        } else {
            Err(BAD_ARGUMENT)
        }
    }

    fn done(&mut self) -> Raw {
        self.done_called = true;
        Ok(())
    }

    fn get_buffer_bytes(&mut self, ty: u32, start: usize, max: usize) -> Result<Option<Vec<u8>>, u32> {
        let data = self.buffer(ty)?;
        Ok(some_if_nonempty(clamp(&data, start, max)))
    }

    fn get_buffer_status(&mut self, ty: u32) -> Result<(usize, u32), u32> {
        Ok((self.buffer(ty)?.len(), 0))
    }

    fn set_buffer_bytes(&mut self, ty: u32, start: usize, size: usize, data: &[u8]) -> Raw {
        let window = self.window();
        let s = self.streams.get_mut(&self.effective).ok_or(BAD_ARGUMENT)?;
        let buf = match (BufferType::from_u32(ty), window) {
            (Some(BufferType::DownstreamData), _) => &mut s.req_buffer,
            (Some(BufferType::UpstreamData), _) => &mut s.resp_buffer,
            (Some(BufferType::HttpRequestBody), Some(Stage::RequestBody(_) | Stage::RequestTrailers)) => {
                &mut s.req_buffer
            }
            (Some(BufferType::HttpResponseBody), Some(Stage::ResponseBody(_) | Stage::ResponseTrailers)) => {
                &mut s.resp_buffer
            }
            _ => return Err(BAD_ARGUMENT),
        };
        // Envoy only supports prepend, replace-all and append.
        if start == 0 && size == 0 {
            buf.splice(0..0, data.iter().copied());
        } else if start == 0 && size >= buf.len() {
            *buf = data.to_vec();
        } else if start >= buf.len() {
            buf.extend_from_slice(data);
        } else {
            return Err(BAD_ARGUMENT);
        }
        Ok(())
    }

    fn get_header_map_pairs(&mut self, map: u32) -> Result<Option<Vec<u8>>, u32> {
        let entries = self.read_map(map)?;
        Ok(Some(pairs::encode(entries.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))))
    }

    fn set_header_map_pairs(&mut self, map: u32, data: &[u8]) -> Raw {
        let entries = decode(data)?;
        *self.map_mut(map)? = entries.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
        Ok(())
    }

    fn get_header_map_size(&mut self, map: u32) -> Result<usize, u32> {
        Ok(self.read_map(map)?.iter().map(|(k, v)| k.len() + v.len()).sum())
    }

    fn get_header_map_value(&mut self, map: u32, key: &[u8]) -> Result<Option<Vec<u8>>, u32> {
        let key = lower(key);
        let entries = self.read_map(map)?;
        match entries.into_iter().find(|(k, _)| *k == key) {
            Some((_, v)) => Ok(some_if_nonempty(v.into_bytes())),
            None => Err(NOT_FOUND),
        }
    }

    fn add_header_map_value(&mut self, map: u32, key: &[u8], value: &[u8]) -> Raw {
        let key = lower(key);
        self.map_mut(map)?.push((key, text(value)));
        Ok(())
    }

    fn replace_header_map_value(&mut self, map: u32, key: &[u8], value: &[u8]) -> Raw {
        let key = lower(key);
        let m = self.map_mut(map)?;
        // Envoy moves a replaced header to the end of the map.
        m.retain(|(k, _)| *k != key);
        m.push((key, text(value)));
        Ok(())
    }

    fn remove_header_map_value(&mut self, map: u32, key: &[u8]) -> Raw {
        let key = lower(key);
        self.map_mut(map)?.retain(|(k, _)| *k != key);
        Ok(())
    }

    fn continue_stream(&mut self, ty: u32) -> Raw {
        let ty = StreamType::from_u32(ty).ok_or(BAD_ARGUMENT)?;
        if !self.streams.contains_key(&self.effective) {
            return Err(NOT_FOUND);
        }
        self.deferred.push(Deferred::Continue(self.effective, ty));
        Ok(())
    }

    fn close_stream(&mut self, ty: u32) -> Raw {
        let ty = StreamType::from_u32(ty).ok_or(BAD_ARGUMENT)?;
        if !self.streams.contains_key(&self.effective) {
            return Err(NOT_FOUND);
        }
        self.deferred.push(Deferred::Close(self.effective, ty));
        Ok(())
    }

    fn send_local_response(
        &mut self,
        status: u32,
        details: &[u8],
        body: &[u8],
        headers: &[u8],
        grpc: i32,
    ) -> Raw {
        let headers = decode(headers)?;
        let window = self.window();
        let s = self.streams.get_mut(&self.effective).ok_or(BAD_ARGUMENT)?;
        let stage = window.or(s.stage).unwrap_or(Stage::Done);
        if stage > Stage::ResponseHeaders || s.local_in_response {
            return Err(BAD_ARGUMENT);
        }
        let grpc_status =
            if grpc < 0 { None } else { GrpcStatus::from_u32(grpc as u32).or(Some(GrpcStatus::Unknown)) };
        s.local = Some(LocalResponse {
            status: u16::try_from(status).map_err(|_| BAD_ARGUMENT)?,
            headers,
            body: body.to_vec(),
            grpc_status,
            details: text(details),
        });
        s.local_new = true;
        Ok(())
    }

    fn get_status(&mut self) -> Result<(u32, Option<Vec<u8>>), u32> {
        let (code, msg) = self.call_status.clone();
        Ok((code, some_if_nonempty(msg.into_bytes())))
    }

    fn http_call(
        &mut self,
        upstream: &[u8],
        headers: &[u8],
        body: &[u8],
        trailers: &[u8],
        timeout_ms: u32,
    ) -> Result<u32, u32> {
        let headers = decode(headers)?;
        for required in [":method", ":path", ":authority"] {
            if !headers.iter().any(|(k, _)| k == required) {
                self.host_log(LogLevel::Warn, format!("http_call without {required}"));
                return Err(BAD_ARGUMENT);
            }
        }
        if upstream.is_empty() {
            return Err(BAD_ARGUMENT);
        }
        let token = self.next_token();
        let call = HttpCallout {
            token,
            context_id: self.effective,
            upstream: text(upstream),
            headers,
            body: body.to_vec(),
            trailers: decode(trailers)?,
            timeout: Duration::from_millis(u64::from(timeout_ms)),
        };
        self.http_calls.insert(token, call);
        Ok(token)
    }

    fn grpc_call(
        &mut self,
        upstream: &[u8],
        service: &[u8],
        method: &[u8],
        metadata: &[u8],
        message: &[u8],
        timeout_ms: u32,
    ) -> Result<u32, u32> {
        if upstream.is_empty() {
            return Err(BAD_ARGUMENT);
        }
        let metadata = pairs::decode(metadata).map_err(|_| BAD_ARGUMENT)?;
        let token = self.next_token();
        let call = GrpcCallout {
            token,
            context_id: self.effective,
            upstream: text(upstream),
            service: text(service),
            method: text(method),
            metadata: metadata.into_iter().map(|(k, v)| (text(k), v.to_vec())).collect(),
            message: message.to_vec(),
            timeout: Duration::from_millis(u64::from(timeout_ms)),
        };
        self.grpc_calls.insert(token, call);
        Ok(token)
    }

    fn grpc_stream(
        &mut self,
        _upstream: &[u8],
        _service: &[u8],
        _method: &[u8],
        _metadata: &[u8],
    ) -> Result<u32, u32> {
        Err(Status::Unimplemented.as_u32())
    }

    fn grpc_send(&mut self, _token: u32, _message: &[u8], _end_stream: bool) -> Raw {
        Err(NOT_FOUND)
    }

    fn grpc_cancel(&mut self, token: u32) -> Raw {
        self.grpc_calls.remove(&token).map(|_| ()).ok_or(NOT_FOUND)
    }

    fn grpc_close(&mut self, token: u32) -> Raw {
        self.grpc_calls.remove(&token).map(|_| ()).ok_or(NOT_FOUND)
    }

    fn get_shared_data(&mut self, key: &[u8]) -> Result<(Option<Vec<u8>>, u32), u32> {
        let store = self.shared.borrow();
        match store.data.get(key) {
            Some((v, cas)) => Ok((some_if_nonempty(v.clone()), *cas)),
            None => Err(NOT_FOUND),
        }
    }

    fn set_shared_data(&mut self, key: &[u8], value: &[u8], cas: u32) -> Raw {
        let mut store = self.shared.borrow_mut();
        if cas != 0 {
            match store.data.get(key) {
                Some((_, current)) if *current == cas => {}
                _ => return Err(CAS_MISMATCH),
            }
        }
        store.next_cas = store.next_cas.wrapping_add(1).max(1);
        let next = store.next_cas;
        store.data.insert(key.to_vec(), (value.to_vec(), next));
        Ok(())
    }

    fn register_shared_queue(&mut self, name: &[u8]) -> Result<u32, u32> {
        let name = text(name);
        let mut store = self.shared.borrow_mut();
        if let Some(i) = store.queues.iter().position(|q| q.vm_id == self.vm_id && q.name == name) {
            store.queues[i].owner = self.host_id;
            return Ok(i as u32 + 1);
        }
        store.queues.push(QueueState {
            vm_id: self.vm_id.clone(),
            name,
            owner: self.host_id,
            items: VecDeque::new(),
        });
        Ok(store.queues.len() as u32)
    }

    fn resolve_shared_queue(&mut self, vm_id: &[u8], name: &[u8]) -> Result<u32, u32> {
        let vm_id = if vm_id.is_empty() { self.vm_id.clone() } else { text(vm_id) };
        let name = text(name);
        let store = self.shared.borrow();
        store
            .queues
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
            .map(|i| i as u32 + 1)
            .ok_or(NOT_FOUND)
    }

    fn enqueue_shared_queue(&mut self, id: u32, data: &[u8]) -> Raw {
        let mut store = self.shared.borrow_mut();
        let index = id.checked_sub(1).ok_or(NOT_FOUND)? as usize;
        let queue = store.queues.get_mut(index).ok_or(NOT_FOUND)?;
        queue.items.push_back(data.to_vec());
        let owner = queue.owner;
        store.ready.push((owner, id));
        Ok(())
    }

    fn dequeue_shared_queue(&mut self, id: u32) -> Result<Option<Vec<u8>>, u32> {
        let mut store = self.shared.borrow_mut();
        let index = id.checked_sub(1).ok_or(NOT_FOUND)? as usize;
        let queue = store.queues.get_mut(index).ok_or(NOT_FOUND)?;
        match queue.items.pop_front() {
            Some(item) => Ok(some_if_nonempty(item)),
            None => Err(EMPTY),
        }
    }

    fn define_metric(&mut self, ty: u32, name: &[u8]) -> Result<u32, u32> {
        let ty = MetricType::from_u32(ty).ok_or(BAD_ARGUMENT)?;
        let name = text(name);
        if let Some(i) = self.metrics.iter().position(|m| m.name == name) {
            if self.metrics[i].ty != ty {
                return Err(BAD_ARGUMENT);
            }
            return Ok(i as u32 + 1);
        }
        self.metrics.push(MetricState { name, ty, value: 0, records: Vec::new() });
        Ok(self.metrics.len() as u32)
    }

    fn increment_metric(&mut self, id: u32, delta: i64) -> Raw {
        let m = self.metric(id)?;
        match m.ty {
            MetricType::Counter if delta <= 0 => Err(BAD_ARGUMENT),
            MetricType::Histogram => Err(BAD_ARGUMENT),
            _ => {
                m.value = m.value.saturating_add(delta);
                Ok(())
            }
        }
    }

    fn record_metric(&mut self, id: u32, value: u64) -> Raw {
        let m = self.metric(id)?;
        match m.ty {
            // Envoy: record on a counter adds to it.
            MetricType::Counter => m.value = m.value.saturating_add(value as i64),
            MetricType::Gauge => m.value = value as i64,
            MetricType::Histogram => m.records.push(value),
        }
        Ok(())
    }

    fn get_metric(&mut self, id: u32) -> Result<u64, u32> {
        let m = self.metric(id)?;
        match m.ty {
            MetricType::Histogram => Err(BAD_ARGUMENT),
            _ => Ok(m.value as u64),
        }
    }

    fn get_property(&mut self, path: &[u8]) -> Result<Option<Vec<u8>>, u32> {
        self.property(path).map(some_if_nonempty).ok_or(NOT_FOUND)
    }

    fn set_property(&mut self, path: &[u8], value: &[u8]) -> Raw {
        let path = path.strip_suffix(&[0]).unwrap_or(path).to_vec();
        match self.streams.get_mut(&self.effective) {
            Some(s) => s.properties.insert(path, value.to_vec()),
            None => self.properties.insert(path, value.to_vec()),
        };
        Ok(())
    }

    fn call_foreign_function(&mut self, name: &[u8], args: &[u8]) -> Result<Option<Vec<u8>>, u32> {
        let f = self.foreign.get_mut(&text(name)).ok_or(NOT_FOUND)?;
        f(args).map(some_if_nonempty)
    }
}
