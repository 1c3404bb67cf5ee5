//! Drives the guest through the real callback sequence, the way a host does:
//! context creation, request headers, body chunks, trailers, the upstream, the
//! response, `on_log`, `on_done`, `on_delete`; pauses wait for `continue_stream`;
//! stream actions run after the callback that asked for them.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use sluice_abi::{Action, LogLevel, StreamType};

use super::state::{Activity, Deferred, HostState, Stage, StreamState};
use super::types::{Message, TestResponse};
use crate::dispatch::{self, Guest};
use crate::sys::native;

const PAUSE: u32 = Action::Pause as u32;

/// One simulated VM: the host state and the guest state, shared by the test host
/// and the exchanges it hands out.
pub(crate) struct Inner {
    pub(crate) host: Rc<RefCell<HostState>>,
    pub(crate) guest: RefCell<Guest>,
    pub(crate) root: u32,
    pub(crate) next_context: Cell<u32>,
}

impl Inner {
    /// Runs one guest callback with this VM's host and guest installed.
    pub(crate) fn invoke<T>(&self, context: u32, activity: Activity, f: impl FnOnce() -> T) -> T {
        {
            let mut h = self.host.borrow_mut();
            h.activity = activity;
            h.effective = context;
        }
        let out = {
            let _host = native::install(self.host.clone());
            let mut guest = self.guest.borrow_mut();
            dispatch::with_installed(&mut guest, f)
        };
        let mut h = self.host.borrow_mut();
        h.activity = Activity::Idle;
        h.effective = 0;
        out
    }

    pub(crate) fn with_stream<T>(&self, context: u32, f: impl FnOnce(&mut StreamState) -> T) -> T {
        let mut h = self.host.borrow_mut();
        match h.streams.get_mut(&context) {
            Some(s) => f(s),
            None => panic!("test host: no stream with context id {context}"),
        }
    }

    /// Creates a stream context and runs it as far as it goes.
    pub(crate) fn start_stream(&self, state: StreamState) -> u32 {
        let id = self.next_context.get();
        self.next_context.set(id + 1);
        self.host.borrow_mut().streams.insert(id, state);
        let root = self.root;
        self.invoke(id, Activity::Root, || dispatch::on_context_create(id, root));
        self.run(id);
        id
    }

    /// Advances `context`, then everything its callbacks set in motion.
    pub(crate) fn run(&self, context: u32) {
        self.advance(context);
        self.pump();
    }

    /// Handles deferred stream actions and queue notifications until none are left.
    pub(crate) fn pump(&self) {
        loop {
            // Local responses sent from callout or root callbacks.
            let locals: Vec<(u32, Stage)> = {
                let h = self.host.borrow();
                h.streams
                    .iter()
                    .filter(|(_, s)| s.local_new)
                    .filter_map(|(id, s)| s.blocked.or(s.stage).map(|stage| (*id, stage)))
                    .collect()
            };
            for (ctx, stage) in locals {
                self.after(ctx, stage, false);
                self.advance(ctx);
            }
            let deferred = std::mem::take(&mut self.host.borrow_mut().deferred);
            let ready = {
                let h = self.host.borrow();
                let mut store = h.shared.borrow_mut();
                let (mine, others): (Vec<_>, Vec<_>) =
                    store.ready.drain(..).partition(|(owner, _)| *owner == h.host_id);
                store.ready = others;
                mine
            };
            if deferred.is_empty() && ready.is_empty() {
                return;
            }
            for d in deferred {
                match d {
                    Deferred::Continue(ctx, ty) => {
                        if self.unblock(ctx, ty) {
                            self.advance(ctx);
                        }
                    }
                    Deferred::Close(ctx, _) => {
                        self.with_stream(ctx, |s| {
                            if s.stage != Some(Stage::Done) {
                                s.reset = true;
                                s.blocked = None;
                                s.stage = Some(Stage::Log);
                            }
                        });
                        self.advance(ctx);
                    }
                }
            }
            let root = self.root;
            for (_, queue) in ready {
                self.invoke(root, Activity::Root, || dispatch::on_queue_ready(root, queue));
            }
        }
    }

    fn unblock(&self, ctx: u32, ty: StreamType) -> bool {
        let unblocked = self.with_stream(ctx, |s| {
            let Some(blocked) = s.blocked else { return false };
            let matches = match ty {
                StreamType::HttpRequest => blocked.is_request(),
                StreamType::HttpResponse => !blocked.is_request(),
                _ => false,
            };
            if !matches {
                return false;
            }
            s.blocked = None;
            match blocked {
                Stage::RequestBody(_) => s.req_forwarded.append(&mut s.req_buffer),
                Stage::ResponseBody(_) => s.resp_forwarded.append(&mut s.resp_buffer),
                _ => {}
            }
            true
        });
        if !unblocked {
            self.host.borrow_mut().host_log(
                LogLevel::Debug,
                format!("continue_stream({ty:?}) on context {ctx} ignored: not paused there"),
            );
        }
        unblocked
    }

    /// Runs callbacks of one stream until it pauses or ends.
    fn advance(&self, ctx: u32) {
        loop {
            let (stage, blocked) = self.with_stream(ctx, |s| (s.stage, s.blocked));
            let Some(stage) = stage else { return };
            if blocked.is_some() {
                return;
            }
            match stage {
                Stage::RequestHeaders => {
                    let (n, eos) = self.with_stream(ctx, |s| {
                        s.stage = Some(if !s.req_chunks.is_empty() {
                            Stage::RequestBody(0)
                        } else if !s.req_trailers.is_empty() {
                            Stage::RequestTrailers
                        } else {
                            Stage::Upstream
                        });
                        (s.req_headers.len(), s.req_chunks.is_empty() && s.req_trailers.is_empty())
                    });
                    let action = self
                        .invoke(ctx, Activity::Stream(stage), || dispatch::on_request_headers(ctx, n, eos));
                    self.after(ctx, stage, action == PAUSE);
                }
                Stage::RequestBody(i) => {
                    let (size, eos) = self.with_stream(ctx, |s| {
                        let chunk = s.req_chunks.get(i).cloned().unwrap_or_default();
                        s.req_buffer.extend_from_slice(&chunk);
                        let last = i + 1 >= s.req_chunks.len();
                        s.stage = Some(if !last {
                            Stage::RequestBody(i + 1)
                        } else if !s.req_trailers.is_empty() {
                            Stage::RequestTrailers
                        } else {
                            Stage::Upstream
                        });
                        (s.req_buffer.len(), last && s.req_trailers.is_empty())
                    });
                    let action = self
                        .invoke(ctx, Activity::Stream(stage), || dispatch::on_request_body(ctx, size, eos));
                    if action != PAUSE {
                        self.with_stream(ctx, |s| s.req_forwarded.append(&mut s.req_buffer));
                    }
                    self.after(ctx, stage, action == PAUSE && eos);
                }
                Stage::RequestTrailers => {
                    let n = self.with_stream(ctx, |s| {
                        s.stage = Some(Stage::Upstream);
                        s.req_trailers.len()
                    });
                    let action =
                        self.invoke(ctx, Activity::Stream(stage), || dispatch::on_request_trailers(ctx, n));
                    self.after(ctx, stage, action == PAUSE);
                }
                Stage::Upstream => self.with_stream(ctx, |s| {
                    s.req_forwarded.append(&mut s.req_buffer);
                    s.upstream_request = Some(Message {
                        headers: s.req_headers.clone(),
                        body: s.req_forwarded.clone(),
                        trailers: s.req_trailers.clone(),
                    });
                    s.resp_headers = s.upstream.head();
                    s.resp_chunks = s.upstream.chunks.clone();
                    s.resp_trailers = s.upstream.trailers.clone();
                    s.stage = Some(Stage::ResponseHeaders);
                }),
                Stage::ResponseHeaders => {
                    let (n, eos) = self.with_stream(ctx, |s| {
                        s.stage = Some(if !s.resp_chunks.is_empty() {
                            Stage::ResponseBody(0)
                        } else if !s.resp_trailers.is_empty() {
                            Stage::ResponseTrailers
                        } else {
                            Stage::Log
                        });
                        (s.resp_headers.len(), s.resp_chunks.is_empty() && s.resp_trailers.is_empty())
                    });
                    let action = self
                        .invoke(ctx, Activity::Stream(stage), || dispatch::on_response_headers(ctx, n, eos));
                    self.after(ctx, stage, action == PAUSE);
                }
                Stage::ResponseBody(i) => {
                    let (size, eos) = self.with_stream(ctx, |s| {
                        let chunk = s.resp_chunks.get(i).cloned().unwrap_or_default();
                        s.resp_buffer.extend_from_slice(&chunk);
                        let last = i + 1 >= s.resp_chunks.len();
                        s.stage = Some(if !last {
                            Stage::ResponseBody(i + 1)
                        } else if !s.resp_trailers.is_empty() {
                            Stage::ResponseTrailers
                        } else {
                            Stage::Log
                        });
                        (s.resp_buffer.len(), last && s.resp_trailers.is_empty())
                    });
                    let action = self
                        .invoke(ctx, Activity::Stream(stage), || dispatch::on_response_body(ctx, size, eos));
                    if action != PAUSE {
                        self.with_stream(ctx, |s| s.resp_forwarded.append(&mut s.resp_buffer));
                    }
                    self.after(ctx, stage, action == PAUSE && eos);
                }
                Stage::ResponseTrailers => {
                    let n = self.with_stream(ctx, |s| {
                        s.stage = Some(Stage::Log);
                        s.resp_trailers.len()
                    });
                    let action =
                        self.invoke(ctx, Activity::Stream(stage), || dispatch::on_response_trailers(ctx, n));
                    self.after(ctx, stage, action == PAUSE);
                }
                Stage::Log => {
                    self.with_stream(ctx, |s| {
                        s.resp_forwarded.append(&mut s.resp_buffer);
                        if s.downstream.is_none() && !s.reset {
                            s.downstream = Some(Message {
                                headers: s.resp_headers.clone(),
                                body: s.resp_forwarded.clone(),
                                trailers: s.resp_trailers.clone(),
                            });
                        }
                        s.stage = Some(Stage::Done);
                    });
                    self.invoke(ctx, Activity::Log, || dispatch::on_log(ctx));
                    self.invoke(ctx, Activity::Root, || dispatch::on_done(ctx));
                    self.invoke(ctx, Activity::Root, || dispatch::on_delete(ctx));
                    self.with_stream(ctx, |s| s.deleted = true);
                    self.host.borrow_mut().http_calls.retain(|_, c| c.context_id != ctx);
                    self.host.borrow_mut().grpc_calls.retain(|_, c| c.context_id != ctx);
                    return;
                }
                Stage::Done => return,
            }
        }
    }

    /// After a stream callback: apply a local response, or record the pause.
    fn after(&self, ctx: u32, stage: Stage, paused: bool) {
        self.with_stream(ctx, |s| {
            if std::mem::take(&mut s.local_new) {
                s.blocked = None;
                s.local_in_response = true;
                let Some(local) = s.local.clone() else { return };
                let mut head = TestResponse::new(local.status);
                for (k, v) in &local.headers {
                    head = head.header(k, v);
                }
                if let Some(grpc) = local.grpc_status {
                    head = head
                        .header("content-type", "application/grpc")
                        .header("grpc-status", &grpc.as_u32().to_string())
                        .header("grpc-message", &String::from_utf8_lossy(&local.body));
                } else {
                    head = head.body(local.body.clone());
                }
                if stage.is_request() {
                    // Envoy sends a local reply through the response path: this
                    // filter's response callbacks see it.
                    s.resp_headers = head.head();
                    s.resp_chunks = head.chunks.clone();
                    s.resp_trailers = Vec::new();
                    s.resp_buffer.clear();
                    s.resp_forwarded.clear();
                    s.stage = Some(Stage::ResponseHeaders);
                } else {
                    s.downstream = Some(Message {
                        headers: head.head(),
                        body: head.joined_body(),
                        trailers: Vec::new(),
                    });
                    s.stage = Some(Stage::Log);
                }
                return;
            }
            if paused {
                s.blocked = Some(stage);
            }
        });
    }
}
