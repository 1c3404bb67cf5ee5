//! The no-op filter written with the Sluice SDK: the floor cost of a filter
//! built with it (the `noop` filter is the same, on the upstream SDK).
use sluice_sdk::{HttpContext, Root, RootContext};

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

impl HttpContext for Noop {}

sluice_sdk::filter!(NoopRoot);
