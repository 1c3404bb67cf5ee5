//! Callbacks a filter leaves to their default: answered by the dispatcher
//! without reaching the context, and declared to the host, which may skip them.

use std::any::TypeId;

use sluice_abi::foreign::{self, noop};

use super::{Ctx, GUEST, HttpSlot, with_guest};
use crate::context::Action;
use crate::http::{HttpState, Phase};
use crate::sys;

/// The [`HttpContext`](crate::HttpContext) callbacks whose default
/// ([`Action::Continue`], nothing else) a filter may keep. The default records,
/// on its first call, that the guest's HTTP context type keeps it, and from
/// then on the dispatcher answers
/// that callback itself: one look-up, the SDK's own bookkeeping, no call into
/// the context. A no-op callback so costs a few dozen instructions instead of a
/// few hundred. The dispatcher also tells the host (the foreign function
/// [`foreign::NOOP_HTTP_CALLBACKS`]), and a host that knows it (Sluice) stops
/// calling them at all, which is most of a trivial filter's cost per request.
///
/// Only the outer type counts: a context that delegates to another type's
/// default (a wrapper) has a method of its own, so nothing is recorded for it.
#[derive(Clone, Copy)]
#[repr(u32)]
pub(crate) enum Kept {
    RequestHeaders = noop::REQUEST_HEADERS,
    RequestBody = noop::REQUEST_BODY,
    RequestTrailers = noop::REQUEST_TRAILERS,
    ResponseHeaders = noop::RESPONSE_HEADERS,
    ResponseBody = noop::RESPONSE_BODY,
    ResponseTrailers = noop::RESPONSE_TRAILERS,
    Log = noop::LOG,
}

/// Called by the default of the callback `which` on `T`: records that the
/// guest's HTTP contexts keep it when `T` is their type, and tells the host.
pub(crate) fn kept<T: ?Sized + 'static>(which: Kept) {
    let declare = GUEST.with(|g| {
        let Ok(mut g) = g.try_borrow_mut() else { return None };
        if g.http_type != Some(TypeId::of::<T>()) {
            return None;
        }
        // What the host was told follows from what was kept before.
        let before = g.kept;
        g.kept |= which as u32;
        let mask = declaration(g.kept);
        (before == 0 || mask != declaration(before)).then_some(mask)
    });
    if let Some(mask) = declare {
        // Hosts that do not know the function answer NotFound: nothing to do.
        let _ = sys::call_foreign_function(foreign::NOOP_HTTP_CALLBACKS.as_bytes(), &mask.to_le_bytes());
    }
}

/// The callbacks the host may skip, given those kept: `on_done` (it always
/// answers `true` for an HTTP context), and a trailers callback only with its
/// body's (trailers deliver the last call of a body buffered until its end).
fn declaration(kept: u32) -> u32 {
    let mut mask = kept | noop::DONE;
    if kept & noop::REQUEST_BODY == 0 {
        mask &= !noop::REQUEST_TRAILERS;
    }
    if kept & noop::RESPONSE_BODY == 0 {
        mask &= !noop::RESPONSE_TRAILERS;
    }
    mask
}

/// Answers callback `which` of HTTP context `id` without calling the context,
/// when its type keeps that callback's default: `update` does the SDK's
/// bookkeeping and gives the result, or `None` when the full path must run.
/// `None` too when the callback is not kept or the context is not an idle HTTP
/// context (the full path reports what is wrong).
pub(super) fn answer_kept<T>(
    id: u32,
    which: Kept,
    update: impl FnOnce(&mut HttpState) -> Option<T>,
) -> Option<T> {
    with_guest(|g| {
        if g.kept & which as u32 == 0 {
            return None;
        }
        match g.contexts.get_mut(id) {
            Some(Ctx::Http(HttpSlot { ctx: Some(_), state })) => update(state),
            _ => None,
        }
    })
}

/// The bookkeeping of a kept headers or trailers callback: it ran and continued.
pub(super) fn kept_headers(state: &mut HttpState, phase: Phase) -> Option<u32> {
    state.last_phase = Some(phase);
    Some(Action::Continue.as_raw())
}

/// The bookkeeping of a kept body callback, the full path's (a default body
/// callback never asks to buffer until the end, so this continues).
pub(super) fn kept_body(until_end: &mut bool, eos: bool) -> u32 {
    if *until_end && !eos {
        return Action::Pause.as_raw();
    }
    *until_end = false;
    Action::Continue.as_raw()
}
