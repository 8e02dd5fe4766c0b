//! Wiring: config -> topics -> store -> pipeline thread + HTTP server, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::api::auth::Access;
use crate::api::portal::Portal;
use crate::api::{self, ApiShared, ApiState};
use crate::config::Config;
use crate::kafka::api_publisher::ApiPublisher;
use crate::kafka::directory::{self, Directory};
use crate::kafka::lag::LagMonitor;
use crate::kafka::{admin, Pipeline, PipelineStatus};
use crate::ledger::Ledger;
use crate::shutdown::Shutdown;
use crate::store::layout::Layout;
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
    metrics_listener: Option<TcpListener>,
    access: Arc<Access>,
    store: Store,
    ledger: Ledger,
    partitions: i32,
    status: Arc<PipelineStatus>,
    shutdown: Shutdown,
}

impl Application {
    /// Checks access control, creates missing topics, checks co-partitioning, opens the store,
    /// binds the API port(s).
    pub async fn build(cfg: Config) -> anyhow::Result<Self> {
        let meters = cfg.meter_set().context("meters")?;
        cfg.api.check_access().context("api")?;
        let access = Access::new(&cfg.api)
            .map_err(anyhow::Error::msg)
            .context("api.keys")?;
        if access.is_open() {
            tracing::warn!(
                "the API is open: no api.keys and api.allow_unauthenticated = true (local development only)"
            );
        }
        let partitions = admin::ensure_topics(&cfg)
            .await
            .context("preparing topics")?;
        std::fs::create_dir_all(&cfg.store.path)
            .with_context(|| format!("creating {}", cfg.store.path.display()))?;
        let store = Store::open(&cfg.store, Layout::from_config(&cfg.pipeline))
            .with_context(|| format!("opening the store at {}", cfg.store.path.display()))?;
        let listener = TcpListener::bind(cfg.api.listen)
            .await
            .with_context(|| format!("binding {}", cfg.api.listen))?;
        let metrics_listener = match cfg.api.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr} (api.metrics_listen)"))?,
            ),
            None => None,
        };
        let threads = cfg.pipeline.threads();
        Ok(Self {
            cfg: Arc::new(cfg),
            listener,
            metrics_listener,
            access: Arc::new(access),
            store,
            ledger: Ledger::new(meters),
            partitions,
            status: Arc::new(PipelineStatus::new(threads)),
            shutdown: Shutdown::default(),
        })
    }

    /// The API's bound address.
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound")
    }

    /// The bound address of `api.metrics_listen`, if set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound"))
    }

    /// The address other instances reach this API at: `api.advertised_url`'s host, else the
    /// listen address.
    pub fn advertised_addr(&self) -> String {
        match &self.cfg.api.advertise {
            Some(a) => a.clone(),
            None => self.addr().to_string(),
        }
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
        )
        .context("listing the partitions in the store")?;
        let span = tracing::Span::current();
        let worker = std::thread::Builder::new()
            .name("pipeline".into())
            .spawn(move || span.in_scope(|| pipeline.run()))
            .context("spawning the pipeline thread")?;
        let directory = Directory::default();
        let announcer = {
            let (cfg, status, dir, shutdown) = (
                self.cfg.clone(),
                self.status.clone(),
                directory.clone(),
                self.shutdown.clone(),
            );
            let url = format!("http://{}", self.advertised_addr());
            let span = tracing::Span::current();
            std::thread::Builder::new()
                .name("directory".into())
                .spawn(move || span.in_scope(|| directory::run(cfg, url, status, dir, shutdown)))
                .context("spawning the directory thread")?
        };
        let state = ApiState::new(ApiShared {
            store: self.store.clone(),
            status: self.status.clone(),
            metrics,
            partitions: self.partitions,
            meters: self.ledger.meters().clone(),
            directory: directory.clone(),
            instance_id: self.cfg.kafka.instance_id.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .context("HTTP client")?,
            access: self.access.clone(),
            portal: Arc::new(Portal::new(
                self.cfg.api.public_url.clone(),
                self.addr().to_string(),
                self.cfg.api.portal_max_ttl,
                ApiPublisher::new(&self.cfg).context("the top-up producer")?,
            )),
            metrics_on_main: self.metrics_listener.is_none(),
        });
        let (store, status) = (self.store.clone(), self.status.clone());
        let gauges = tokio::spawn(async move {
            for tick in 0u64.. {
                let (store, status) = (store.clone(), status.clone());
                // RocksDB reads block: off the async workers. The meter scan every third tick.
                let _ = tokio::task::spawn_blocking(move || {
                    store_gauges(&store, &status, tick % 3 == 0)
                })
                .await;
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
        let lag = match LagMonitor::new(&self.cfg, self.partitions) {
            Ok(monitor) => {
                let shutdown = self.shutdown.clone();
                let span = tracing::Span::current();
                let thread = std::thread::Builder::new()
                    .name("consumer-lag".into())
                    .spawn(move || span.in_scope(|| monitor.run(Duration::from_secs(5), shutdown)))
                    .context("spawning the lag thread")?;
                Some(thread)
            }
            Err(e) => {
                tracing::error!(error = %e, "no consumer lag metrics: the lag consumer cannot be created");
                None
            }
        };
        let shutdown = self.shutdown.clone();
        let stopped = async move { shutdown.recv().await };
        tracing::info!(addr = %self.addr(), "API listening");
        let metrics_server = match self.metrics_listener {
            Some(listener) => {
                let shutdown = self.shutdown.clone();
                let app = api::metrics_router(state.clone());
                tracing::info!(addr = %listener.local_addr().expect("bound"), "metrics listening");
                Some(tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move { shutdown.recv().await })
                        .await
                }))
            }
            None => None,
        };
        axum::serve(self.listener, api::router(state))
            .with_graceful_shutdown(stopped)
            .await
            .context("HTTP server")?;
        if let Some(m) = metrics_server {
            m.await
                .context("joining the metrics server")?
                .context("metrics server")?;
        }
        gauges.abort();
        tokio::task::spawn_blocking(move || worker.join())
            .await
            .context("joining the pipeline")?
            .map_err(|_| anyhow::anyhow!("the pipeline thread panicked"))?
            .context("the pipeline stopped")?;
        tokio::task::spawn_blocking(move || announcer.join())
            .await
            .context("joining the directory thread")?
            .map_err(|_| anyhow::anyhow!("the directory thread panicked"))?;
        if let Some(lag) = lag {
            tokio::task::spawn_blocking(move || lag.join())
                .await
                .context("joining the lag thread")?
                .map_err(|_| anyhow::anyhow!("the lag thread panicked"))?;
        }
        Ok(())
    }
}

/// Sets the store gauges from RocksDB's properties and, if `count`, recounts the meters and
/// customers of the owned partitions (a key scan). Blocking.
fn store_gauges(store: &Store, status: &PipelineStatus, count: bool) {
    use crate::metrics as m;
    let props = [
        (m::STORE_LIVE_BYTES, "rocksdb.estimate-live-data-size"),
        (m::STORE_KEYS, "rocksdb.estimate-num-keys"),
        (m::STORE_SST_BYTES, "rocksdb.total-sst-files-size"),
        (m::STORE_MEMTABLE_BYTES, "rocksdb.cur-size-all-mem-tables"),
        (m::STORE_BLOCK_CACHE_USAGE, "rocksdb.block-cache-usage"),
        (
            m::STORE_BLOCK_CACHE_CAPACITY,
            "rocksdb.block-cache-capacity",
        ),
        (
            m::STORE_PENDING_COMPACTION,
            "rocksdb.estimate-pending-compaction-bytes",
        ),
    ];
    for (metric, property) in props {
        if let Some(v) = store.property_int(property) {
            metrics::gauge!(metric).set(v as f64);
        }
    }
    let owned = status.owned();
    for (kind, bytes) in store.bytes_by_kind(owned.iter().copied()) {
        metrics::gauge!(m::STORE_KIND_BYTES, "kind" => kind).set(bytes as f64);
    }
    if count {
        let (mut customers, mut meters) = (0, 0);
        for &p in &owned {
            match store.count_meters(p) {
                Ok((c, n)) => (customers, meters) = (customers + c, meters + n),
                Err(e) => {
                    tracing::warn!(error = %e, partition = p, "counting meters failed");
                    return;
                }
            }
        }
        metrics::gauge!(m::STORE_CUSTOMERS).set(customers as f64);
        metrics::gauge!(m::STORE_METERS).set(meters as f64);
    }
}
