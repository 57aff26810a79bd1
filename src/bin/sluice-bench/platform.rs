//! The platform under test, started as `scripts/platform` starts it: the four services, each
//! awaited through its own `<binary> health` probe, then the gateway. Every process gets its
//! own SQLite database and log file in the run's temp dir, the benchmark vhost and
//! `RUST_LOG=warn` (or the benchmark's own `RUST_LOG`, to measure another log level). Stopped
//! with SIGTERM, as an orchestrator would.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// The services, in start order.
pub const SERVICES: [&str; 4] = ["inventory", "payment", "notification", "orders"];

/// The SKU every benchmark order buys; its stock never runs out.
pub const SKU: &str = "BENCH-1";

struct Process {
    name: &'static str,
    child: Child,
    /// Where it serves `/health` and `/metrics`.
    ops_addr: String,
    /// Its stdout and stderr.
    log: PathBuf,
}

/// The running processes. Dropping it stops whatever is still running.
pub struct Platform {
    bin_dir: PathBuf,
    /// Where every process exports its spans (`--otlp`), or `None` for no export.
    otlp: Option<String>,
    processes: Vec<Process>,
    /// Where the gateway serves gRPC.
    pub grpc_addr: SocketAddr,
}

/// A port that was free a moment ago, and not one of `taken`. A process binds its ports only
/// once it is connected to the broker; until then the kernel may hand the same port out again,
/// and two processes given one ops port would look alike to the health probe (the first
/// answers for both; the second exits, unable to bind).
fn free_port(taken: &mut Vec<u16>) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
        let port = listener.local_addr()?.port();
        if !taken.contains(&port) {
            taken.push(port);
            return Ok(port);
        }
    }
    bail!("no free port that was not handed out already")
}

/// Where the binaries are: `--bin-dir`, or next to this executable.
pub fn bin_dir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match explicit {
        Some(dir) => dir.to_owned(),
        None => std::env::current_exe()
            .context("locating sluice-bench")?
            .parent()
            .context("sluice-bench has no parent directory")?
            .to_owned(),
    };
    for name in SERVICES.iter().chain(&["gateway"]) {
        let binary = dir.join(format!("sluice-{name}"));
        if !binary.is_file() {
            bail!("{} is missing: run `cargo build --release --workspace --bins` (or pass --bin-dir)", binary.display());
        }
    }
    Ok(dir)
}

impl Platform {
    /// Starts the services, waits until each is ready, then starts the gateway and waits for it.
    pub fn start(bin_dir: &Path, amqp_url: &str, dir: &Path, otlp: Option<String>) -> anyhow::Result<Self> {
        let catalog = dir.join("catalog.json");
        let items = serde_json::json!([{ "sku": SKU, "name": "Benchmark widget", "price_cents": 100, "stock": 1_000_000_000_000_i64 }]);
        std::fs::write(&catalog, items.to_string()).context("writing the catalog")?;
        let mut platform =
            Self { bin_dir: bin_dir.to_owned(), otlp, processes: Vec::new(), grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)) };
        let mut ops = Vec::new();
        let mut ports = Vec::new();
        for name in SERVICES {
            let ops_addr = format!("127.0.0.1:{}", free_port(&mut ports)?);
            let mut env = vec![("DATABASE_URL".to_owned(), format!("sqlite://{}?mode=rwc", dir.join(format!("{name}.db")).display()))];
            if name == "inventory" {
                env.push(("SLUICE_CATALOG".into(), catalog.display().to_string()));
            }
            platform.spawn(name, &ops_addr, amqp_url, dir, &env)?;
            ops.push((name, ops_addr));
        }
        for (name, ops_addr) in &ops {
            platform.wait_ready(name, ops_addr)?;
        }
        let ops_addr = format!("127.0.0.1:{}", free_port(&mut ports)?);
        let grpc_addr = SocketAddr::from(([127, 0, 0, 1], free_port(&mut ports)?));
        platform.spawn("gateway", &ops_addr, amqp_url, dir, &[("SLUICE_GRPC_ADDR".into(), grpc_addr.to_string())])?;
        platform.wait_ready("gateway", &ops_addr)?;
        platform.grpc_addr = grpc_addr;
        platform.all_running()?;
        Ok(platform)
    }

    /// Fails if a process has exited, with the end of its log: a health probe answered by
    /// another process must not hide it (one full run on 2026-12-06 went on without inventory,
    /// which had exited 1, and measured nothing but `UNAVAILABLE`).
    fn all_running(&mut self) -> anyhow::Result<()> {
        for process in &mut self.processes {
            if let Some(status) = process.child.try_wait()? {
                let log = std::fs::read_to_string(&process.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!("sluice-{} exited during start-up ({status}); its log ends: {}", process.name, tail.into_iter().rev().collect::<Vec<_>>().join(" | "));
            }
        }
        Ok(())
    }

    fn spawn(&mut self, name: &'static str, ops_addr: &str, amqp_url: &str, dir: &Path, env: &[(String, String)]) -> anyhow::Result<()> {
        let log_path = dir.join(format!("{name}.log"));
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let binary = self.bin_dir.join(format!("sluice-{name}"));
        // `SLUICE_BENCH_WRAP_GATEWAY="valgrind --tool=callgrind"` (or `_ORDERS`, ...) runs the
        // process under that command, as `scripts/instructions` does to count its instructions.
        let wrapper = std::env::var(format!("SLUICE_BENCH_WRAP_{}", name.to_uppercase())).unwrap_or_default();
        let mut command = match wrapper.split_whitespace().collect::<Vec<_>>().split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        match &self.otlp {
            Some(endpoint) => command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            None => command.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT"),
        };
        let child = command
            .env("OTEL_SERVICE_NAME", format!("sluice-{name}"))
            .env("SLUICE_OPS_ADDR", ops_addr)
            .env("SLUICE_AMQP_URL", amqp_url)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .env_remove("SLUICE_AUTH_TOKENS")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("sharing the log file")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting sluice-{name}"))?;
        self.processes.push(Process { name, child, ops_addr: ops_addr.to_owned(), log: log_path });
        Ok(())
    }

    /// Polls `<binary> health` (the process's own readiness probe) for up to 60 s.
    fn wait_ready(&mut self, name: &str, ops_addr: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let binary = self.bin_dir.join(format!("sluice-{name}"));
        while Instant::now() < deadline {
            let probe = Command::new(&binary)
                .arg("health")
                .env("SLUICE_OPS_ADDR", ops_addr)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .with_context(|| format!("running sluice-{name} health"))?;
            if probe.success() {
                return Ok(());
            }
            self.all_running()?;
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("sluice-{name} was not ready within 60 s")
    }

    /// Name and process id of each running process.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.processes.iter().map(|p| (p.name, p.child.id())).collect()
    }

    /// Deliveries per database transaction so far, by queue, from each service's `/metrics`
    /// (`sluice_deliveries_total / sluice_batches_total`).
    pub fn batch_sizes(&self) -> anyhow::Result<Vec<(String, f64)>> {
        let mut sizes = Vec::new();
        for process in self.processes.iter().filter(|p| p.name != "gateway") {
            let url = format!("http://{}/metrics", process.ops_addr);
            let text = ureq::get(&url).call().and_then(|mut r| r.body_mut().read_to_string()).with_context(|| format!("GET {url}"))?;
            let samples = |metric: &str| -> Vec<(String, f64)> {
                let prefix = format!("{metric}{{queue=\"");
                text.lines()
                    .filter_map(|line| {
                        let (queue, value) = line.strip_prefix(&prefix)?.split_once("\"} ")?;
                        Some((queue.to_owned(), value.trim().parse().ok()?))
                    })
                    .collect()
            };
            let batches = samples("sluice_batches_total");
            for (queue, deliveries) in samples("sluice_deliveries_total") {
                if let Some((_, count)) = batches.iter().find(|(q, _)| *q == queue).filter(|(_, n)| *n > 0.0) {
                    sizes.push((queue, deliveries / count));
                }
            }
        }
        Ok(sizes)
    }

    /// Peak resident memory (VmHWM) of each running process, in KiB.
    pub fn peak_rss(&self) -> Vec<(&'static str, anyhow::Result<u64>)> {
        self.processes.iter().map(|p| (p.name, vm_hwm(p.child.id()))).collect()
    }

    /// Stops the named processes (SIGTERM, then SIGKILL after 30 s) and returns how each ended.
    pub fn stop(&mut self, names: &[&str]) -> Vec<(&'static str, String)> {
        let (stopping, keep): (Vec<Process>, Vec<Process>) =
            self.processes.drain(..).partition(|p| names.contains(&p.name));
        self.processes = keep;
        for process in &stopping {
            let _ = Command::new("kill").args(["-TERM", &process.child.id().to_string()]).status();
        }
        stopping.into_iter().map(|mut p| (p.name, describe(wait_or_kill(&mut p.child)))).collect()
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let names: Vec<&str> = self.processes.iter().map(|p| p.name).collect();
        for (name, ended) in self.stop(&names) {
            if ended != "exit 0" {
                eprintln!("sluice-{name} stopped: {ended}");
            }
        }
    }
}

fn wait_or_kill(child: &mut Child) -> std::io::Result<ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()
}

fn describe(ended: std::io::Result<ExitStatus>) -> String {
    match ended {
        Ok(status) => match status.code() {
            Some(code) => format!("exit {code}"),
            None => format!("{status}"),
        },
        Err(e) => format!("unknown ({e})"),
    }
}

/// What the processes logged at warn level and above, from their log files.
#[derive(Debug, Default, Clone, Copy)]
pub struct Logged {
    pub warnings: usize,
    pub errors: usize,
    /// Handler failures sent for redelivery after a backoff.
    pub retries: usize,
}

/// Counts the warn and error lines of every log in `dir`.
pub fn logged(dir: &Path) -> Vec<(&'static str, Logged)> {
    SERVICES
        .iter()
        .chain(&["gateway"])
        .map(|name| {
            let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
            let logged = Logged {
                warnings: count(r#""level":"WARN""#),
                errors: count(r#""level":"ERROR""#),
                retries: count("retrying later"),
            };
            (*name, logged)
        })
        .collect()
}

/// `VmHWM` of `/proc/<pid>/status`, in KiB.
fn vm_hwm(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).with_context(|| format!("no VmHWM in {path}"))?;
    let kib = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim();
    kib.parse().with_context(|| format!("parsing {line:?}"))
}
