//! The no-op filter written with the Sluice SDK: the floor cost of a filter
//! built with it (the `noop` filter is the same, on the upstream SDK).
use sluice_sdk::{Action, Error, Http, HttpContext, Root, RootContext};

#[derive(Default)]
struct NoopRoot;

impl RootContext for NoopRoot {
    type Config = ();
    type Http = Noop;

    fn new_http(&mut self, _root: &mut Root) -> Noop {
        Noop
    }
}

struct Noop;

// Like the upstream `noop`, it answers request headers with Continue; the other
// callbacks keep their defaults.
impl HttpContext for Noop {
    fn on_request_headers(&mut self, _http: &mut Http, _end_of_stream: bool) -> Result<Action, Error> {
        Ok(Action::Continue)
    }
}

sluice_sdk::filter!(NoopRoot);
