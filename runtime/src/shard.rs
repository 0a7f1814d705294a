//! Shards: one OS thread per core, pinned, each running its own monoio reactor (io_uring, or epoll
//! where io_uring is refused or where told to), its own listeners, buffer pool and counters. Shards
//! share nothing on the per-connection path; they meet only in the snapshot channel, the drain
//! signal and counters read from outside.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use monoio::net::{TcpListener, TcpStream};
use monoio::time::TimeDriver;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use rustc_hash::FxHashMap;

use crate::bell::{Bell, Ringer};
use crate::buffer::{BufferPool, PoolConfig};
use crate::counters::{ShardStats, StatsSet};
use crate::drain::{self, DrainSignal, ShardDrain};
use crate::listener::{BindError, ListenerSpec};
use crate::snapshot::{ShardView, Subscriber};

/// Which reactor a shard should try.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriverChoice {
    /// io_uring, falling back to epoll where the kernel refuses it.
    Auto,
    /// epoll only.
    Epoll,
}

/// How the kernel schedules the shard threads (only they: the control, log and admin threads stay
/// as they are).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedPolicy {
    /// `SCHED_OTHER`, the kernel's default.
    #[default]
    Normal,
    /// `SCHED_BATCH`: a woken shard does not preempt the thread that is running, and waits until
    /// that thread sleeps or its slice ends. When the thread that woke it is its peer about to
    /// sleep (an app that just wrote a request, the other proxy of a hop), this saves a context
    /// switch and a cold return per hop: at 1,000 req/s on 2 cores, 17–34% of the CPU per
    /// request of shoal's paths and 13–32% of their median latency. Beside CPU-bound work on the
    /// same cores it is a loss: a woken shard waits out the other thread's slice, milliseconds
    /// per hop; and a lone connection's round trip got slower (ARCHITECTURE.md, "Reactors"). For
    /// nodes whose cores carry I/O-bound work only, or cores reserved for the mesh.
    Batch,
}

/// The reactor a shard actually runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Driver {
    IoUring,
    Epoll,
}

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        })
    }
}

impl std::fmt::Display for SchedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SchedPolicy::Normal => "normal",
            SchedPolicy::Batch => "batch",
        })
    }
}

/// io_uring submission queue entries per shard: room for a read and a write on ~2,000 connections
/// in one turn; monoio submits early when it fills.
pub const URING_ENTRIES: u32 = 4096;

/// Default time open connections get to finish once a drain starts.
pub const DEFAULT_DRAIN_TIMEOUT_S: u64 = 30;

/// How the shards are started.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Number of shards; 0 means one per core this process may run on.
    pub shards: usize,
    pub driver: DriverChoice,
    /// Pin shard i to the i-th allowed core (wrapping round when there are more shards than cores).
    pub pin: bool,
    pub drain_timeout: Duration,
    pub pool: PoolConfig,
    pub sched_policy: SchedPolicy,
    /// Share the listening addresses with a running instance (SO_REUSEPORT, same user) instead
    /// of refusing them, to take over from it: see `RuntimeArgs::replace`.
    pub replace: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            shards: 0,
            driver: DriverChoice::Auto,
            pin: true,
            drain_timeout: Duration::from_secs(DEFAULT_DRAIN_TIMEOUT_S),
            pool: PoolConfig::default(),
            sched_policy: SchedPolicy::Normal,
            replace: false,
        }
    }
}

/// The runtime's command-line flags, for every binary to flatten into its own.
#[derive(Clone, Debug, clap::Args)]
pub struct RuntimeArgs {
    /// Number of shards (reactor threads); 0 = one per core this process may run on.
    #[arg(long, env = "SHOAL_SHARDS", default_value_t = 0)]
    pub shards: usize,
    /// Reactor: io_uring with epoll fallback (auto), or epoll only.
    #[arg(long, env = "SHOAL_DRIVER", value_enum, default_value_t = DriverChoice::Auto)]
    pub driver: DriverChoice,
    /// Do not pin shards to cores.
    #[arg(long, env = "SHOAL_NO_PIN")]
    pub no_pin: bool,
    /// Seconds open connections get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "SHOAL_DRAIN_TIMEOUT_S", default_value_t = DEFAULT_DRAIN_TIMEOUT_S)]
    pub drain_timeout_s: u64,
    /// Scheduling policy of the shard threads: normal, or batch where the node's cores carry no
    /// CPU-bound work beside the mesh (see `SchedPolicy`).
    #[arg(long, env = "SHOAL_SCHED_POLICY", value_enum, default_value_t = SchedPolicy::Normal)]
    pub sched_policy: SchedPolicy,
    /// Take over from a running instance on the same addresses, as an upgrade does: listen
    /// beside it (SO_REUSEPORT; both must run as the same user) instead of refusing its ports,
    /// then send it SIGTERM once this one is ready. It stops accepting and drains its open
    /// connections (give it a `--drain-timeout-s` as long as they may live) while this one
    /// takes every new connection, so none is refused. Set `net.ipv4.tcp_migrate_req=1` so that
    /// connections queued on its listeners when they close move to this one's.
    #[arg(long, env = "SHOAL_REPLACE")]
    pub replace: bool,
}

impl From<&RuntimeArgs> for RuntimeConfig {
    fn from(args: &RuntimeArgs) -> Self {
        RuntimeConfig {
            shards: args.shards,
            driver: args.driver,
            pin: !args.no_pin,
            drain_timeout: Duration::from_secs(args.drain_timeout_s),
            pool: PoolConfig::default(),
            sched_policy: args.sched_policy,
            replace: args.replace,
        }
    }
}

/// What a started shard reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ShardInfo {
    pub index: usize,
    /// The core it is pinned to, if pinned.
    pub core: Option<usize>,
    pub driver: Driver,
    /// The scheduling policy the shard thread runs under (normal where the one asked for was
    /// refused).
    pub sched_policy: SchedPolicy,
    /// Listeners in the order they were given, with the ports the kernel chose for port 0.
    pub listeners: Vec<SocketAddr>,
}

/// Why the runtime did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("shard {shard}: cannot start a reactor: {cause}")]
    Reactor { shard: usize, cause: std::io::Error },
    #[error("cannot start shard thread {shard}: {cause}")]
    Thread { shard: usize, cause: std::io::Error },
    #[error("shard {shard} stopped during start-up")]
    Lost { shard: usize },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

type ThreadHook = Arc<dyn Fn(usize) + Send + Sync>;

/// Starts shards.
pub struct Builder {
    config: RuntimeConfig,
    listeners: Vec<ListenerSpec>,
    on_thread_start: Option<ThreadHook>,
}

/// The running shards.
pub struct Runtime {
    threads: Vec<JoinHandle<()>>,
    drain: DrainSignal,
    shards: Vec<ShardInfo>,
    stats: StatsSet,
}

impl Runtime {
    pub fn builder(config: RuntimeConfig) -> Builder {
        Builder {
            config,
            listeners: Vec::new(),
            on_thread_start: None,
        }
    }

    pub fn shards(&self) -> &[ShardInfo] {
        &self.shards
    }

    pub fn stats(&self) -> StatsSet {
        self.stats.clone()
    }

    pub fn drain_signal(&self) -> DrainSignal {
        self.drain.clone()
    }

    /// Stops accepting everywhere and lets connections finish (up to the drain deadline).
    pub fn begin_drain(&self) {
        self.drain.trigger();
    }

    /// Waits until every shard has finished draining.
    pub fn join(self) {
        for t in self.threads {
            if t.join().is_err() {
                tracing::error!("a shard thread panicked outside any connection");
            }
        }
    }

    /// From now on, the first SIGTERM/SIGINT drains and a second exits at once. Install this
    /// before telling anyone the process is ready: a SIGTERM that arrives earlier would get the
    /// default action and kill the process without a drain.
    pub fn handle_signals(&self) -> Result<(), StartError> {
        drain::on_signals(self.drain.clone()).map_err(StartError::Signals)
    }
}

impl Builder {
    /// Every shard binds its own copy of `spec`, in the order listeners are added.
    pub fn listener(mut self, spec: ListenerSpec) -> Self {
        self.listeners.push(spec);
        self
    }

    /// Runs `hook(shard_index)` on each shard thread before its reactor is built (after pinning),
    /// e.g. to apply a per-thread seccomp filter.
    pub fn on_thread_start(mut self, hook: impl Fn(usize) + Send + Sync + 'static) -> Self {
        self.on_thread_start = Some(Arc::new(hook));
        self
    }

    /// Starts the shards and runs `shard_main` on each. Returns once every shard has bound its
    /// listeners, or the first error (then no shard is left running).
    pub fn start<F, Fut>(self, shard_main: F) -> Result<Runtime, StartError>
    where
        F: Fn(Shard) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        crate::memory::keep_freed_buffers();
        if let Err(e) = crate::limits::raise_open_files_limit() {
            tracing::warn!(error = %e, "could not raise the open-file limit; connections beyond it will be refused");
        }
        let Builder {
            config,
            listeners,
            on_thread_start,
        } = self;
        let listeners: Vec<ListenerSpec> = listeners
            .iter()
            .map(|spec| spec.claim(config.replace))
            .collect::<Result<_, _>>()?;
        if config.replace {
            crate::listener::warn_unless_requests_migrate();
        }
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let count = match config.shards {
            0 => cores.len().max(1),
            n => n,
        };
        let drain = DrainSignal::new();
        let shard_main = Arc::new(shard_main);
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<ShardInfo, StartError>)>();
        let mut threads = Vec::with_capacity(count);
        let mut all_stats = Vec::with_capacity(count);
        for index in 0..count {
            let stats = Arc::new(ShardStats::default());
            all_stats.push(stats.clone());
            let core = if config.pin && !cores.is_empty() {
                Some(cores[index % cores.len()])
            } else {
                None
            };
            let start = ShardStart {
                index,
                core,
                config: config.clone(),
                listeners: listeners.clone(),
                drain: drain.clone(),
                stats,
                hook: on_thread_start.clone(),
            };
            let main = shard_main.clone();
            let ready = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("shoal-shard-{index}"))
                .spawn(move || start.run(main, ready));
            match spawned {
                Ok(t) => threads.push(t),
                Err(cause) => {
                    drain.trigger();
                    threads.into_iter().for_each(|t| drop(t.join()));
                    return Err(StartError::Thread {
                        shard: index,
                        cause,
                    });
                }
            }
        }
        drop(ready_tx);
        let mut shards: Vec<Option<ShardInfo>> = vec![None; count];
        let mut failure = None;
        for _ in 0..count {
            match ready_rx.recv() {
                Ok((i, Ok(info))) => shards[i] = Some(info),
                Ok((_, Err(e))) => {
                    failure.get_or_insert(e);
                }
                Err(_) => break,
            }
        }
        let missing = shards.iter().position(Option::is_none);
        if failure.is_some() || missing.is_some() {
            drain.trigger();
            threads.into_iter().for_each(|t| drop(t.join()));
            return Err(failure.unwrap_or(StartError::Lost {
                shard: missing.unwrap_or(0),
            }));
        }
        let shards: Vec<ShardInfo> = shards.into_iter().flatten().collect();
        let drivers: Vec<String> = shards.iter().map(|s| s.driver.to_string()).collect();
        let cores: Vec<String> = shards
            .iter()
            .map(|s| s.core.map_or("-".into(), |c| c.to_string()))
            .collect();
        let policies: Vec<String> = shards.iter().map(|s| s.sched_policy.to_string()).collect();
        tracing::info!(
            shards = shards.len(),
            drivers = %drivers.join(","),
            cores = %cores.join(","),
            sched_policies = %policies.join(","),
            "runtime started"
        );
        Ok(Runtime {
            threads,
            drain,
            shards,
            stats: StatsSet::new(all_stats),
        })
    }
}

struct ShardStart {
    index: usize,
    core: Option<core_affinity::CoreId>,
    config: RuntimeConfig,
    listeners: Vec<ListenerSpec>,
    drain: DrainSignal,
    stats: Arc<ShardStats>,
    hook: Option<ThreadHook>,
}

type Ready = mpsc::Sender<(usize, Result<ShardInfo, StartError>)>;

/// Tells the starting thread this shard could not set up its reactor (or its doorbell on it).
fn reactor_failed(ready: &Ready, shard: usize, cause: std::io::Error) {
    let _ = ready.send((shard, Err(StartError::Reactor { shard, cause })));
}
/// Where and how a shard thread runs, as the kernel took it.
#[derive(Clone, Copy)]
struct Placement {
    core: Option<usize>,
    sched_policy: SchedPolicy,
}

/// Puts the calling thread under `policy`; what it runs under afterwards. A refusal (a seccomp
/// profile, a restricted container) leaves it normal, with a warning, rather than failing.
fn apply_sched_policy(shard: usize, policy: SchedPolicy) -> SchedPolicy {
    let kernel_policy = match policy {
        SchedPolicy::Normal => return SchedPolicy::Normal,
        SchedPolicy::Batch => libc::SCHED_BATCH,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` lives across the call.
    if unsafe { libc::sched_setscheduler(0, kernel_policy, &param) } == 0 {
        policy
    } else {
        let cause = std::io::Error::last_os_error();
        tracing::warn!(shard, ?policy, error = %cause, "could not set the scheduling policy; running normal");
        SchedPolicy::Normal
    }
}

type UringRuntime = monoio::Runtime<TimeDriver<IoUringDriver>>;
type EpollRuntime = monoio::Runtime<TimeDriver<LegacyDriver>>;

enum Reactor {
    IoUring(UringRuntime),
    Epoll(EpollRuntime),
}

impl ShardStart {
    fn run<F, Fut>(self, main: Arc<F>, ready: Ready)
    where
        F: Fn(Shard) -> Fut,
        Fut: Future<Output = ()> + 'static,
    {
        let index = self.index;
        let mut pinned = None;
        if let Some(core) = self.core {
            if core_affinity::set_for_current(core) {
                pinned = Some(core.id);
            } else {
                tracing::warn!(
                    shard = index,
                    core = core.id,
                    "could not pin shard; running unpinned"
                );
            }
        }
        let placed = Placement {
            core: pinned,
            sched_policy: apply_sched_policy(index, self.config.sched_policy),
        };
        if let Some(hook) = &self.hook {
            hook(index);
        }
        let reactor = match build_reactor(index, self.config.driver) {
            Ok(r) => r,
            Err(cause) => {
                return reactor_failed(&ready, index, cause);
            }
        };
        match reactor {
            Reactor::IoUring(mut rt) => {
                rt.block_on(self.serve(Driver::IoUring, placed, main, ready))
            }
            Reactor::Epoll(mut rt) => rt.block_on(self.serve(Driver::Epoll, placed, main, ready)),
        }
    }

    async fn serve<F, Fut>(self, driver: Driver, placed: Placement, main: Arc<F>, ready: Ready)
    where
        F: Fn(Shard) -> Fut,
        Fut: Future<Output = ()> + 'static,
    {
        let index = self.index;
        let mut bound = Vec::with_capacity(self.listeners.len());
        for spec in &self.listeners {
            let listener = match spec.bind().map(TcpListener::from_std) {
                Ok(Ok(l)) => l,
                Ok(Err(cause)) | Err(BindError { cause, .. }) => {
                    let err = BindError {
                        name: spec.name.clone(),
                        addr: spec.addr,
                        cause,
                    };
                    let _ = ready.send((index, Err(err.into())));
                    return;
                }
            };
            bound.push(ShardListener {
                listener,
                spec: spec.clone(),
            });
        }
        let (ringer, bell) = match Bell::start() {
            Ok(b) => b,
            Err(cause) => {
                return reactor_failed(&ready, index, cause);
            }
        };
        // Subscribed before reporting ready, so a drain that starts right after start-up is seen.
        let drain = self.drain.watch_on(ringer.clone(), bell.clone());
        let info = ShardInfo {
            index,
            core: placed.core,
            driver,
            sched_policy: placed.sched_policy,
            listeners: self.listeners.iter().map(|s| s.addr).collect(),
        };
        if ready.send((index, Ok(info))).is_err() {
            return;
        }
        drop(ready);
        let tracker = ConnTracker::new(self.stats.clone());
        let shard = Shard {
            index,
            driver,
            listeners: RefCell::new(bound),
            drain: drain.clone(),
            ringer,
            bell,
            pool: BufferPool::new(self.config.pool, self.stats.clone()),
            stats: self.stats.clone(),
            tracker: tracker.clone(),
        };
        monoio::spawn(CatchUnwind {
            inner: main(shard),
            stats: self.stats.clone(),
            what: "shard main",
        });
        drain.wait().await;
        // Accept loops end on the same signal; give open connections until the deadline.
        let deadline = self.config.drain_timeout;
        monoio::select! {
            _ = tracker.idle() => tracing::debug!(shard = index, "drained"),
            _ = monoio::time::sleep(deadline) => tracing::warn!(
                shard = index,
                open = tracker.open(),
                deadline_s = deadline.as_secs_f64(),
                "drain deadline passed; closing the connections left"
            ),
        }
        tracker.cut_all();
        // One more turn of the reactor: dropped listeners and connections queue their closes (and
        // io_uring the cancels of their pending accepts); without a turn to submit them, a listener
        // could outlive its shard and keep accepting into a queue nobody reads.
        monoio::time::sleep(Duration::from_millis(1)).await;
        // Returning drops the reactor and every task on it, which closes their sockets.
    }
}

/// Builds this shard's reactor: io_uring unless told otherwise, epoll when io_uring is refused
/// (seccomp, an old kernel, `kernel.io_uring_disabled`) or lacks an operation monoio needs.
fn build_reactor(index: usize, choice: DriverChoice) -> std::io::Result<Reactor> {
    let epoll = || -> std::io::Result<Reactor> {
        Ok(Reactor::Epoll(
            RuntimeBuilder::<LegacyDriver>::new()
                .enable_timer()
                .build()?,
        ))
    };
    if choice == DriverChoice::Epoll {
        return epoll();
    }
    // Built on this thread, not probed once per process, so a refusal that applies to one thread
    // (a seccomp filter) is seen where it applies.
    let build = |tuned: bool| {
        let mut ring = io_uring::IoUring::builder();
        if tuned {
            // Each ring is used by its shard's thread only. COOP_TASKRUN runs completion work when
            // the thread next enters the kernel instead of interrupting it; SINGLE_ISSUER lets the
            // kernel skip cross-thread locking. Measured here: 2.4x the request rate of a plain ring
            // at 16 connections and 40% of its CPU per request (see bench-results/). Kernel 6.0+.
            ring.setup_coop_taskrun().setup_single_issuer();
        }
        RuntimeBuilder::<IoUringDriver>::new()
            .with_entries(URING_ENTRIES)
            .uring_builder(ring)
            .enable_timer()
            .build()
    };
    let uring = build(true).or_else(|e| {
        tracing::debug!(shard = index, error = %e, "tuned io_uring refused; trying a plain ring");
        build(false)
    });
    match uring {
        Ok(rt) if monoio::utils::detect_uring() => Ok(Reactor::IoUring(rt)),
        Ok(_) => {
            tracing::warn!(
                shard = index,
                "io_uring lacks operations monoio needs; falling back to epoll"
            );
            epoll()
        }
        Err(e) => {
            tracing::warn!(shard = index, error = %e, "io_uring refused; falling back to epoll");
            epoll()
        }
    }
}

/// A listener on one shard, with the options its accepted connections get.
pub struct ShardListener {
    pub listener: TcpListener,
    pub spec: ListenerSpec,
}

/// What a shard's main function is given: `!Send`, it lives on the shard.
pub struct Shard {
    pub index: usize,
    pub driver: Driver,
    listeners: RefCell<Vec<ShardListener>>,
    drain: ShardDrain,
    ringer: Ringer,
    bell: Rc<Bell>,
    pool: BufferPool,
    stats: Arc<ShardStats>,
    tracker: ConnTracker,
}

impl Shard {
    /// Takes this shard's listeners (in the order they were added to the builder).
    pub fn take_listeners(&self) -> Vec<ShardListener> {
        std::mem::take(&mut *self.listeners.borrow_mut())
    }

    /// Binds another listener on this shard while it runs (say a pod's address that came with a
    /// new snapshot). As at start-up, every shard binds its own copy with SO_REUSEPORT.
    pub fn bind(&self, spec: &ListenerSpec) -> Result<ShardListener, BindError> {
        let listener = TcpListener::from_std(spec.bind()?).map_err(|cause| BindError {
            name: spec.name.clone(),
            addr: spec.addr,
            cause,
        })?;
        Ok(ShardListener {
            listener,
            spec: spec.clone(),
        })
    }

    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }

    pub fn stats(&self) -> &Arc<ShardStats> {
        &self.stats
    }

    pub fn drain(&self) -> &ShardDrain {
        &self.drain
    }

    /// This shard's view of a snapshot channel, with state derived by `derive` (see `ShardView`).
    pub fn view<T: 'static, L: 'static>(
        &self,
        subscriber: Subscriber<T>,
        derive: impl Fn(&T) -> L + 'static,
    ) -> Rc<ShardView<T, L>> {
        Rc::new(subscriber.view_on(self.ringer.clone(), self.bell.clone(), derive))
    }

    /// Connections being served on this shard.
    pub fn open_connections(&self) -> usize {
        self.tracker.open()
    }

    /// Accepts on `listener` until the drain starts, running `handle` for each connection as a
    /// tracked task (drain waits for it; a panic in it is contained and counted). Closes the
    /// listener when it returns, so new connections are refused once every shard has stopped.
    ///
    /// A connection the kernel had already queued when the drain began is served, not reset: its
    /// client saw the handshake complete and may have sent its request.
    pub async fn serve<H, Fut>(&self, listener: ShardListener, mut handle: H)
    where
        H: FnMut(TcpStream, SocketAddr) -> Fut,
        Fut: Future<Output = ()> + 'static,
    {
        let ShardListener { listener, spec } = listener;
        loop {
            let mut accept = std::pin::pin!(listener.accept());
            let accepted = monoio::select! {
                accepted = &mut accept => Some(accepted),
                _ = self.drain.wait() => None,
            };
            let Some(accepted) = accepted else {
                for (stream, peer) in stop_listening(&listener, &spec, accept).await {
                    self.stats.connections_accepted.inc();
                    self.spawn(handle(stream, peer));
                }
                break;
            };
            match accepted {
                Ok((stream, peer)) => {
                    self.stats.connections_accepted.inc();
                    // TCP_NODELAY comes from the listener (Linux copies it to accepted
                    // sockets; a test checks), so no system call is spent on it here.
                    close_on_exec(&stream);
                    self.spawn(handle(stream, peer));
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS pass; spinning on them would starve the shard.
                    self.stats.accept_errors.inc();
                    tracing::warn!(shard = self.index, listener = %spec.name, error = %e, "accept failed");
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Keeps `view` current on this shard even when no connection arrives: re-derives its state as
    /// soon as a new snapshot is published and records the version in the shard's counters.
    pub fn follow<T: 'static, L: 'static>(&self, view: Rc<ShardView<T, L>>) {
        let drain = self.drain.clone();
        let stats = self.stats.clone();
        stats.config_version.set(view.version());
        monoio::spawn(async move {
            loop {
                monoio::select! {
                    _ = view.changed() => {}
                    _ = drain.wait() => return,
                }
                drop(view.current());
                stats.config_version.set(view.version());
            }
        });
    }

    /// Runs `task` on this shard as a tracked connection (see `serve`).
    pub fn spawn(&self, task: impl Future<Output = ()> + 'static) {
        // Boxed at once: a connection's future is kilobytes, and monoio moves the task it is
        // given through several frames before it lands in the task's cell, where a box moves as
        // a pointer (about 2,000 instructions of copying per connection, callgrind).
        monoio::spawn(Tracked {
            inner: Box::pin(task),
            guard: self.tracker.enter(),
            stats: self.stats.clone(),
            registered: None,
        });
    }
}

/// Counts a shard's open connections, wakes the drain when the last one ends, and cuts the ones
/// left at the drain deadline.
#[derive(Clone)]
struct ConnTracker(Rc<TrackerInner>);

struct TrackerInner {
    open: Cell<usize>,
    idle_waiter: RefCell<Option<Waker>>,
    /// Each open connection's waker, so a cut can reach connections parked on I/O.
    conns: RefCell<FxHashMap<u64, Waker>>,
    next_id: Cell<u64>,
    cut: Cell<bool>,
    stats: Arc<ShardStats>,
}

struct ConnGuard {
    tracker: ConnTracker,
    id: u64,
}

impl ConnTracker {
    fn new(stats: Arc<ShardStats>) -> Self {
        ConnTracker(Rc::new(TrackerInner {
            open: Cell::new(0),
            idle_waiter: RefCell::new(None),
            conns: RefCell::new(FxHashMap::default()),
            next_id: Cell::new(0),
            cut: Cell::new(false),
            stats,
        }))
    }

    fn open(&self) -> usize {
        self.0.open.get()
    }

    fn enter(&self) -> ConnGuard {
        let open = self.0.open.get() + 1;
        self.0.open.set(open);
        self.0.stats.connections_active.set(open as u64);
        let id = self.0.next_id.get();
        self.0.next_id.set(id + 1);
        ConnGuard {
            tracker: self.clone(),
            id,
        }
    }

    async fn idle(&self) {
        poll_fn(|cx| {
            if self.open() == 0 {
                Poll::Ready(())
            } else {
                *self.0.idle_waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Ends every open connection: each is woken and drops its future (and so its sockets) while
    /// the reactor still runs to close them. Dropping the reactor instead would leak them: monoio
    /// does not drop tasks parked on I/O when it is torn down.
    fn cut_all(&self) {
        self.0.cut.set(true);
        let wakers: Vec<Waker> = self.0.conns.borrow_mut().drain().map(|(_, w)| w).collect();
        for w in wakers {
            w.wake();
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let inner = &self.tracker.0;
        inner.conns.borrow_mut().remove(&self.id);
        let open = inner.open.get() - 1;
        inner.open.set(open);
        inner.stats.connections_active.set(open as u64);
        if open == 0 {
            if let Some(w) = inner.idle_waiter.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

/// A connection task: counted while it lives, cut at the drain deadline, and with any panic in it
/// contained so the shard and its other connections live on.
struct Tracked<F> {
    inner: F,
    guard: ConnGuard,
    stats: Arc<ShardStats>,
    /// The waker last put in the tracker's map: the map is touched only when it changes, not at
    /// every poll.
    registered: Option<Waker>,
}

impl<F: Future<Output = ()>> Future for Tracked<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `inner` is never moved out of the pinned struct.
        let this = unsafe { self.get_unchecked_mut() };
        let tracker = &this.guard.tracker.0;
        if tracker.cut.get() {
            return Poll::Ready(());
        }
        if !this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            let waker = cx.waker().clone();
            tracker
                .conns
                .borrow_mut()
                .insert(this.guard.id, waker.clone());
            this.registered = Some(waker);
        }
        let inner = unsafe { Pin::new_unchecked(&mut this.inner) };
        poll_catching_panics(inner, cx, &this.stats, "connection")
    }
}

/// Polls `inner`, turning a panic into a finished task (logged and counted).
fn poll_catching_panics<F: Future<Output = ()>>(
    inner: Pin<&mut F>,
    cx: &mut Context<'_>,
    stats: &ShardStats,
    what: &'static str,
) -> Poll<()> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
        Ok(poll) => poll,
        Err(panic) => {
            stats.task_panics.inc();
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(task = what, panic = %message, "task panicked; the shard carries on");
            Poll::Ready(())
        }
    }
}

/// The shard's main task, with panics contained like a connection's.
struct CatchUnwind<F> {
    inner: F,
    stats: Arc<ShardStats>,
    what: &'static str,
}

impl<F: Future<Output = ()>> Future for CatchUnwind<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `inner` is never moved out of the pinned struct.
        let this = unsafe { self.get_unchecked_mut() };
        let inner = unsafe { Pin::new_unchecked(&mut this.inner) };
        poll_catching_panics(inner, cx, &this.stats, this.what)
    }
}

/// How long a drain waits for a listener's pending accept to end once the listener is shut down.
const STOP_ACCEPT_TIMEOUT_S: u64 = 1;

/// Stops `listener` at the start of a drain and returns the connections it still held: those the
/// kernel had queued, and the one the accept in flight may have taken meanwhile.
///
/// Why not drop the pending accept: under io_uring that only asks for a cancel, and an accept
/// that completes first hands back a descriptor nobody owns; its client would wait forever. Shut
/// down for reading, a listening socket stops listening (new connections are refused) and wakes
/// its pending accept with an error, which is then awaited to its end.
async fn stop_listening(
    listener: &TcpListener,
    spec: &ListenerSpec,
    accept: Pin<&mut impl Future<Output = std::io::Result<(TcpStream, SocketAddr)>>>,
) -> Vec<(TcpStream, SocketAddr)> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the listener owns the descriptor and outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    let socket = socket2::SockRef::from(&fd);
    let mut taken = Vec::new();
    // The listener is non-blocking: this takes what is queued and stops at EAGAIN.
    while let Ok((conn, peer)) = socket.accept() {
        let Some(peer) = peer.as_socket() else {
            continue;
        };
        let conn = std::net::TcpStream::from(conn);
        match conn
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(conn))
        {
            Ok(stream) => taken.push((stream, peer)),
            Err(e) => {
                tracing::warn!(listener = %spec.name, error = %e, "a connection queued at drain could not be served")
            }
        }
    }
    // Queued connections still there (arrived since the loop above) are reset by the shutdown.
    if let Err(e) = socket.shutdown(std::net::Shutdown::Read) {
        tracing::warn!(listener = %spec.name, error = %e, "stopping the listener failed; it closes when dropped");
        return taken;
    }
    // Bounded, so a kernel that did not wake the accept cannot hold the drain up.
    if let Ok(Ok((stream, peer))) =
        monoio::time::timeout(Duration::from_secs(STOP_ACCEPT_TIMEOUT_S), accept).await
    {
        close_on_exec(&stream);
        taken.push((stream, peer));
    }
    taken
}

/// Marks an accepted socket close-on-exec. io_uring's accept in monoio passes no flags, so without
/// this every child process (a health-check script, a test's curl) inherits the connection and
/// holds it open after we close it: the peer then waits for an EOF that comes only when the child
/// exits.
fn close_on_exec(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor the stream owns; F_SETFD changes only its flags.
    unsafe {
        libc::fcntl(stream.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
}
