//! A filter that reads a request header, sets one request header and adds one
//! response header: the typical cheap filter (the one performance.md measured
//! on Envoy + V8).
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;
impl Context for Root {}
impl RootContext for Root {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Rewrite { tenant: None }))
    }
}

struct Rewrite {
    tenant: Option<String>,
}
impl Context for Rewrite {}
impl HttpContext for Rewrite {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.tenant = self.get_http_request_header("x-tenant");
        self.set_http_request_header("x-wasm-filter", Some("1"));
        Action::Continue
    }
    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.add_http_response_header("x-wasm-filter", self.tenant.as_deref().unwrap_or("none"));
        Action::Continue
    }
}
