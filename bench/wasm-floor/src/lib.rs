//! The floor of the gateway benchmark (`bench/run`'s `wasm_floor` row): a proxy-wasm filter
//! that does nothing but exist, one root context and a stream context per request answering
//! `Continue`, so that every row can be judged against what any wasm filter costs in the
//! same Envoy, apart from what paystile's own work costs. Built for `wasm32-wasip1` by the
//! bench; natively it is an empty library.

#[cfg(target_arch = "wasm32")]
mod floor {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{ContextType, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| Box::new(Floor));
    }}

    struct Floor;

    impl Context for Floor {}

    impl RootContext for Floor {
        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Floor))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    impl HttpContext for Floor {}
}
