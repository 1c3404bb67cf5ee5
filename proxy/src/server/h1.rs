//! The downstream HTTP/1.1 connection driver. One task per connection reads a
//! request head, runs the request's handler, writes its response and loops:
//! no dispatcher, no channels, one read buffer for the connection's life
//! (hyper's server allocated a fresh 8 KiB buffer per request). The codec
//! halves are in `crate::h1::{request, response}`.
//!
//! While a handler runs and its request body is complete, the driver keeps
//! reading: pipelined bytes wait in the buffer, and an EOF means the client
//! went away, which cancels the request (and its upstream exchange).

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::{Method, Request, StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use super::AcceptCtx;
use super::conn::{Activity, Control};
use crate::body::ProxyBody;
use crate::error::{ProxyError, error_response};
use crate::forward::{ConnInfo, handle};
use crate::h1::Io;
use crate::h1::request::{Core, DownstreamBody, RequestHead, parse_request};
use crate::h1::response::{Asked, ResponseWriter, encode_head};

/// Bytes a read asks for while waiting for a head.
const READ_HEAD: usize = 8 * 1024;
/// Pipelined bytes read ahead while a request is handled.
const READ_AHEAD: usize = 64 * 1024;
/// How long a closing connection reads (and drops) what the client still
/// sends, so its unread bytes do not turn the close into a reset that
/// destroys the response in flight (nginx's lingering close).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;
/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A downstream connection handed over by a `101 Switching Protocols`: the
/// transport and the bytes the client sent after its request head.
pub type Upgraded = (Io, BytesMut);

/// Put in a request's extensions when it asks for an upgrade: resolves once
/// the `101` went out. `Arc<Mutex>` because extensions must be `Sync`.
#[derive(Clone)]
pub struct OnUpgrade(std::sync::Arc<parking_lot::Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    /// Takes the receiver (once).
    pub fn take(&self) -> Option<oneshot::Receiver<Upgraded>> {
        self.0.lock().take()
    }
}

// Not boxed: a head is moved once, and a box would be one more allocation per request.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(RequestHead),
    Error(ProxyError),
    H2,
    Closed,
}

/// Serves HTTP/1.1 on `io` until the connection ends. With `h2c`, a client
/// opening with the HTTP/2 preface gets the transport and the bytes read
/// back, to be served as HTTP/2.
pub(super) async fn serve(
    io: Io,
    conn: Rc<ConnInfo>,
    cx: &Rc<AcceptCtx>,
    activity: &Rc<Activity>,
    control: &Control,
    h2c: bool,
) -> Option<Upgraded> {
    let core = Rc::new(RefCell::new(Core::new(io, BytesMut::with_capacity(READ_HEAD))));
    let mut head_buf = Vec::with_capacity(512);
    let mut writer = ResponseWriter::new();
    let limits = &cx.config.limits;
    let mut first = true;
    loop {
        let next = poll_fn(|t| {
            poll_head(
                &core,
                limits.max_request_headers,
                limits.max_request_header_bytes,
                control,
                first && h2c,
                t,
            )
        })
        .await;
        first = false;
        let head = match next {
            Next::Request(h) => h,
            Next::Closed => return None,
            Next::H2 => {
                let mut c = core.try_borrow_mut().ok()?;
                let rbuf = std::mem::take(&mut c.rbuf);
                return c.io.take().map(|io| (io, rbuf));
            }
            Next::Error(e) => {
                refuse(&core, &conn, &e, &mut writer, &mut head_buf, control).await;
                return None;
            }
        };
        let RequestHead { mut parts, decoder, keep_alive, expect_continue, upgrade, trailers_ok } = head;
        let asked = Asked { head: parts.method == Method::HEAD, http10: parts.version == Version::HTTP_10 };
        let generation = core.try_borrow_mut().ok()?.next_request(decoder, expect_continue);
        let upgrade_tx = upgrade.then(|| {
            let (tx, rx) = oneshot::channel();
            parts.extensions.insert(OnUpgrade(std::sync::Arc::new(parking_lot::Mutex::new(Some(rx)))));
            tx
        });
        let body = if decoder.is_done() {
            ProxyBody::empty()
        } else {
            ProxyBody::downstream(DownstreamBody::new(core.clone(), generation, decoder))
        };
        let mut guard = activity.begin();
        let resp = {
            let fut = handle(Request::from_parts(parts, body), conn.clone(), guard.started());
            tokio::pin!(fut);
            poll_fn(|t| {
                if control.close.get() {
                    return Poll::Ready(None);
                }
                match fut.as_mut().poll(t) {
                    Poll::Ready(Ok(r)) => Poll::Ready(Some(r)),
                    Poll::Ready(Err(never)) => match never {},
                    Poll::Pending if client_gone(&core, t) => Poll::Ready(None),
                    Poll::Pending => {
                        control.park(t.waker());
                        Poll::Pending
                    }
                }
            })
            .await
        };
        // The client went away, or the watcher closed the connection.
        let resp = resp?;
        guard.completed = true;
        let (parts, mut body) = resp.into_parts();
        let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS && upgrade_tx.is_some();
        let keep_alive = keep_alive && !control.shutdown.get() && !switching;
        let (framing, keep_alive) = encode_head(&parts, &body, asked, keep_alive, &mut head_buf);
        // A filter chain reads the head in `on_log`: it takes it instead of a copy.
        body.keep_head(parts);
        writer.start(body, framing, trailers_ok);
        let written = send(&mut writer, &head_buf, &core, control).await;
        // The request stays active until its response body ends.
        drop(guard);
        if let Err(e) = written {
            if let Some(e) = e {
                // Sluice itself failed the response before a byte of it went
                // out: answer with that error. Once bytes went out, closing is
                // all that is left.
                if writer.answers(&e) {
                    refuse(&core, &conn, &e, &mut writer, &mut head_buf, control).await;
                    return None;
                }
                tracing::debug!(listener = %cx.name, error = %e, "downstream response failed");
            }
            return None;
        }
        if switching {
            let mut c = core.try_borrow_mut().ok()?;
            let rbuf = std::mem::take(&mut c.rbuf);
            if let (Some(io), Some(tx)) = (c.io.take(), upgrade_tx) {
                let _ = tx.send((io, rbuf));
            }
            return None;
        }
        let (broken, body_done) =
            core.try_borrow().map_or((true, false), |c| (c.broken, c.decoder.is_done()));
        if !(keep_alive && writer.complete && body_done && !broken) {
            close(&core, !body_done || broken).await;
            return None;
        }
    }
}

/// Reads until a whole request head (or the HTTP/2 preface) is in the buffer.
fn poll_head(
    core: &RefCell<Core>,
    max_headers: usize,
    max_bytes: usize,
    control: &Control,
    h2c: bool,
    t: &mut Context<'_>,
) -> Poll<Next> {
    let Ok(mut c) = core.try_borrow_mut() else { return Poll::Ready(Next::Closed) };
    let c = &mut *c;
    loop {
        if control.close.get() {
            return Poll::Ready(Next::Closed);
        }
        if c.rbuf.is_empty() {
            // Idle between requests: a drain closes it now.
            if control.shutdown.get() {
                return Poll::Ready(Next::Closed);
            }
        } else if h2c && PREFACE.starts_with(&c.rbuf[..c.rbuf.len().min(PREFACE.len())]) {
            if c.rbuf.len() >= PREFACE.len() {
                return Poll::Ready(Next::H2);
            }
        } else {
            match parse_request(&mut c.rbuf, max_headers, max_bytes) {
                Ok(Some(h)) => return Poll::Ready(Next::Request(h)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Next::Error(e)),
            }
        }
        match c.poll_fill(t, READ_HEAD) {
            Poll::Pending => {
                control.park(t.waker());
                return Poll::Pending;
            }
            // A partial head at EOF is dropped, as hyper does.
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Next::Closed),
            Poll::Ready(Ok(_)) => {}
        }
    }
}

/// Whether the client closed its connection while its request (whose body
/// was all read) is handled. Reads pipelined bytes ahead on the way.
fn client_gone(core: &RefCell<Core>, t: &mut Context<'_>) -> bool {
    let Ok(mut c) = core.try_borrow_mut() else { return false };
    let c = &mut *c;
    if !c.decoder.is_done() {
        return false;
    }
    loop {
        if c.rbuf.len() >= READ_AHEAD {
            return false;
        }
        match c.poll_fill(t, READ_HEAD) {
            Poll::Ready(Ok(0) | Err(_)) => return true,
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return false,
        }
    }
}

/// Writes the response `writer` was started with; `Err(None)` when the
/// watcher closed the connection first.
async fn send(
    writer: &mut ResponseWriter,
    head: &[u8],
    core: &RefCell<Core>,
    control: &Control,
) -> Result<(), Option<ProxyError>> {
    poll_fn(|t| {
        if control.close.get() {
            return Poll::Ready(Err(None));
        }
        match writer.poll(head, core, t) {
            Poll::Pending => {
                control.park(t.waker());
                Poll::Pending
            }
            Poll::Ready(r) => Poll::Ready(r.map_err(Some)),
        }
    })
    .await
}

/// Answers with `e` (a request the codec refused, 400 or 431, or a response
/// Sluice failed before writing any of it), then closes.
async fn refuse(
    core: &RefCell<Core>,
    conn: &ConnInfo,
    e: &ProxyError,
    writer: &mut ResponseWriter,
    head_buf: &mut Vec<u8>,
    control: &Control,
) {
    conn.shared.metrics.local_replies.with_label_values(&[e.reason()]).inc();
    tracing::debug!(listener = %conn.listener, remote = %conn.remote, error = %e, "answered with an error, closing");
    let (parts, body) = error_response(e, false).into_parts();
    let asked = Asked { head: false, http10: false };
    let (framing, _) = encode_head(&parts, &body, asked, false, head_buf);
    writer.start(body, framing, false);
    if send(writer, head_buf, core, control).await.is_ok() {
        close(core, true).await;
    }
}

/// Ends the connection: FIN after the last response, and when the client may
/// still be sending, a bounded read of what it sends first.
async fn close(core: &RefCell<Core>, linger: bool) {
    let Some(mut io) = core.try_borrow_mut().ok().and_then(|mut c| c.io.take()) else { return };
    if io.shutdown().await.is_err() || !linger {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut buf = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}
