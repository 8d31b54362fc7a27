//! The `/metrics` endpoint: a small HTTP server (tiny_http) on the address the admin set
//! (`metrics_listen`; loopback in the shipped config). `GET /metrics` answers the text
//! exposition; anything else gets 404 or 405. No request body is read.
//!
//! Threading: one thread takes requests and renders them one at a time (a scrape holds
//! the state mutex while it refreshes); tiny_http's own threads read the connections.

use std::sync::Arc;
use std::thread::JoinHandle;

use crate::{Metrics, MetricsError, Result, CONTENT_TYPE};

/// A running endpoint; `stop` (or drop) ends it.
pub struct Endpoint {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    /// Where it listens (the port chosen, for "host:0").
    pub addr: String,
}

impl Endpoint {
    pub fn start(addr: &str, metrics: Arc<Metrics>) -> Result<Endpoint> {
        let server = tiny_http::Server::http(addr).map_err(|e| MetricsError::Listen {
            addr: addr.to_string(),
            msg: e.to_string(),
        })?;
        let server = Arc::new(server);
        let bound = server.server_addr().to_string();
        let s = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&s, &metrics))
            .map_err(|e| MetricsError::Listen {
                addr: addr.to_string(),
                msg: format!("starting its thread: {e}"),
            })?;
        Ok(Endpoint {
            server,
            thread: Some(thread),
            addr: bound,
        })
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(server: &tiny_http::Server, metrics: &Metrics) {
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or("");
        let response = match (req.method(), path) {
            (tiny_http::Method::Get, "/metrics") => {
                let r = tiny_http::Response::from_string(metrics.render());
                match tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE) {
                    Ok(h) => r.with_header(h),
                    Err(()) => r,
                }
            }
            (tiny_http::Method::Get, _) => {
                tiny_http::Response::from_string("not found; try /metrics\n").with_status_code(404)
            }
            _ => tiny_http::Response::from_string("only GET\n").with_status_code(405),
        };
        if let Err(e) = req.respond(response) {
            log::debug!("metrics: answering a scrape: {e}");
        }
    }
}
