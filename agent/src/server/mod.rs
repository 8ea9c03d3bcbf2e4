//! HTTP endpoints: /metrics (OpenMetrics text), /healthz, /readyz; served
//! under the limits in `limits.rs` that keep slow or stuck clients from
//! holding the agent up.
use std::{
    future::Future,
    io,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{
    collector::Collector,
    probes::{Job, Probes},
};

mod limits;

pub use limits::{Guarded, Limited, Limits};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The agent's shared state: the collection stage and the attach stage,
/// each behind its own lock (never both held at once).
pub struct App {
    pub collector: Mutex<Collector>,
    pub probes: Mutex<Probes>,
    pub registry: Registry,
    /// Discovery has scanned /proc once (true at once without discovery).
    pub scanned: AtomicBool,
    /// Executables read lately (watching a process reads its executable).
    pub binaries: Mutex<crate::watch::Binaries>,
}

/// A lock that a panic elsewhere must not wedge.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl App {
    pub fn with_collector<T>(&self, f: impl FnOnce(&mut Collector) -> T) -> T {
        f(&mut lock(&self.collector))
    }

    pub fn with_probes<T>(&self, f: impl FnOnce(&mut Probes) -> T) -> T {
        f(&mut lock(&self.probes))
    }

    pub fn with_binaries<T>(&self, f: impl FnOnce(&mut crate::watch::Binaries) -> T) -> T {
        f(&mut lock(&self.binaries))
    }

    /// Runs attach jobs off the attach stage's lock, handing each one's
    /// links back as it is done.
    pub fn run_jobs(&self, jobs: Vec<Job>) {
        for job in jobs {
            let done = job.run();
            self.with_probes(|p| p.install(done));
        }
    }

    /// Detaches and forgets every watched process that exited.
    pub fn reap(&self) {
        for (pid, exe) in self.with_collector(|c| c.exited()) {
            self.unwatch(pid);
            tracing::info!(pid, exe = %exe, "process exited; detached, its series removed");
        }
    }

    /// Detaches a process's probes and removes its series.
    pub fn unwatch(&self, pid: u32) {
        self.with_probes(|p| p.detach(pid));
        self.with_collector(|c| c.remove(pid));
    }

    fn render(&self) -> Result<String, std::fmt::Error> {
        // Fold in what the kernel has before answering, so a scrape right
        // after an event sees it.
        self.with_collector(|c| {
            c.drain();
            c.sync();
        });
        crate::export::prometheus::render(&self.registry)
    }
}

/// The endpoints; `/metrics` only when `prometheus` (not
/// `--no-prometheus`).
pub fn router(app: Arc<App>, prometheus: bool) -> Router {
    let router = if prometheus {
        Router::new().route("/metrics", get(metrics))
    } else {
        Router::new()
    };
    router
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/", get(index))
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    match app.render() {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if !app.scanned.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: discovery has not finished its first scan of /proc\n",
        )
            .into_response()
    } else if app.with_collector(|c| c.ready()) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: some requested processes have no probes attached (see the agent log)\n",
        )
            .into_response()
    }
}

async fn index() -> &'static str {
    "gopulse: /metrics /healthz /readyz\n"
}

/// Serves `router` on `listener` under [`Limits`] until `stop` resolves;
/// then lets requests in flight finish for at most `drain` and drops the
/// connections still open (a client that does not read must not hold the
/// agent's exit up).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> io::Result<()> {
    let listener = Limited::new(listener, limits);
    let open = listener.open();
    let (begin, begun) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        let _ = begun.await;
    });
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        r = &mut server => return r,
        () = stop => {}
    }
    let _ = begin.send(());
    match tokio::time::timeout(drain, server).await {
        Ok(r) => r,
        Err(_) => {
            // Dropping the server leaves its connection tasks to the end
            // of the runtime, which the exit does not wait for.
            tracing::info!(
                open = open.load(Ordering::Relaxed),
                "HTTP: connections still open after {drain:?}; closing them"
            );
            Ok(())
        }
    }
}
