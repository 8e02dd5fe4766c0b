//! Wiring: config -> topics -> store -> pipeline thread + HTTP server, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::kafka::{admin, Pipeline, PipelineStatus, Shutdown};
use crate::ledger::Ledger;
use crate::store::Store;

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(crate::metrics::install).clone()
}

/// A built, not yet running, drawdown instance.
pub struct Application {
    cfg: Arc<Config>,
    listener: TcpListener,
    store: Store,
    ledger: Ledger,
    partitions: i32,
    status: Arc<PipelineStatus>,
    shutdown: Shutdown,
}

impl Application {
    /// Creates missing topics, checks co-partitioning, opens the store, binds the API port.
    pub async fn build(cfg: Config) -> anyhow::Result<Self> {
        let meters = cfg.meter_set().context("meters")?;
        let partitions = admin::ensure_topics(&cfg).await.context("preparing topics")?;
        std::fs::create_dir_all(&cfg.store.path)
            .with_context(|| format!("creating {}", cfg.store.path.display()))?;
        let store = Store::open(&cfg.store).context("opening the store")?;
        let listener = TcpListener::bind(cfg.api.listen)
            .await
            .with_context(|| format!("binding {}", cfg.api.listen))?;
        Ok(Self {
            cfg: Arc::new(cfg),
            listener,
            store,
            ledger: Ledger::new(meters),
            partitions,
            status: Arc::new(PipelineStatus::default()),
            shutdown: Shutdown::default(),
        })
    }

    /// The API's bound address.
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound")
    }

    /// The shutdown handle: `trigger()` drains, commits and stops.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// The pipeline's status.
    pub fn status(&self) -> Arc<PipelineStatus> {
        self.status.clone()
    }

    /// Runs the pipeline and the API until shutdown is triggered.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let metrics = metrics_handle();
        let pipeline = Pipeline::new(
            self.cfg.clone(),
            self.ledger.clone(),
            self.store.clone(),
            self.status.clone(),
            self.shutdown.clone(),
            self.partitions,
        );
        let span = tracing::Span::current();
        let worker = std::thread::Builder::new()
            .name("pipeline".into())
            .spawn(move || span.in_scope(|| pipeline.run()))
            .context("spawning the pipeline thread")?;
        let state = ApiState {
            store: self.store.clone(),
            status: self.status.clone(),
            metrics,
            partitions: self.partitions,
            meters: self.ledger.meters().clone(),
        };
        let store = self.store.clone();
        let gauges = tokio::spawn(async move {
            loop {
                metrics::gauge!(crate::metrics::STORE_LIVE_BYTES).set(store.live_data_size() as f64);
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
        let shutdown = self.shutdown.clone();
        let stopped = async move {
            while !shutdown.is_triggered() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tracing::info!(addr = %self.addr(), "API listening");
        axum::serve(self.listener, api::router(state))
            .with_graceful_shutdown(stopped)
            .await
            .context("HTTP server")?;
        gauges.abort();
        tokio::task::spawn_blocking(move || worker.join())
            .await
            .context("joining the pipeline")?
            .map_err(|_| anyhow::anyhow!("the pipeline thread panicked"))?;
        Ok(())
    }
}
