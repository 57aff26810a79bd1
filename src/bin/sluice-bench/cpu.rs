//! Where the CPU went during a scenario: user + system time of each platform process, of the
//! broker (`beam.smp`) and of this load generator, from `/proc/<pid>/stat`. On a 2-core
//! machine they all share the same cores, so this says who the bottleneck is.

use std::time::{Duration, Instant};

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds used so far by `pid`, if it is running.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields we need follow its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// The broker's process id, found by its command name.
fn broker_pid() -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().into_string().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// A snapshot to measure CPU use from.
pub struct Usage {
    at: Instant,
    processes: Vec<(String, String, f64)>,
}

impl Usage {
    /// Snapshots the given processes, the broker and this process.
    pub fn start(platform: &[(&'static str, u32)]) -> Self {
        let mut named: Vec<(String, String)> = platform.iter().map(|(name, pid)| ((*name).to_owned(), pid.to_string())).collect();
        if let Some(pid) = broker_pid() {
            named.push(("rabbitmq".into(), pid));
        }
        named.push(("sluice-bench".into(), "self".into()));
        let processes = named
            .into_iter()
            .filter_map(|(name, pid)| cpu_seconds(&pid).map(|seconds| (name, pid, seconds)))
            .collect();
        Self { at: Instant::now(), processes }
    }

    /// Cores used by each process since the snapshot, busiest first: `rabbitmq 0.93, ...`.
    pub fn report(&self) -> String {
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        let mut used: Vec<(&str, f64)> = self
            .processes
            .iter()
            .filter_map(|(name, pid, before)| cpu_seconds(pid).map(|now| (name.as_str(), (now - before) / wall)))
            .collect();
        used.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = used.iter().map(|(_, c)| c).sum();
        let parts: Vec<String> = used.iter().map(|(name, cores)| format!("{name} {cores:.2}")).collect();
        format!("{total:.2} cores: {}", parts.join(", "))
    }
}

/// Waits, at most `limit`, until the broker has used less than `threshold` cores over half a
/// second: after a scenario, quorum queues go on writing and compacting their logs (and
/// deleting the queues and messages of the run), and a scenario started meanwhile would pay for
/// the previous one. Returns how long it waited, and whether the broker went quiet.
pub async fn settle_broker(threshold: f64, limit: Duration) -> (Duration, bool) {
    let started = Instant::now();
    let Some(pid) = broker_pid() else { return (Duration::ZERO, false) };
    let window = Duration::from_millis(500);
    while started.elapsed() < limit {
        let Some(before) = cpu_seconds(&pid) else { break };
        tokio::time::sleep(window).await;
        let Some(after) = cpu_seconds(&pid) else { break };
        if (after - before) / window.as_secs_f64() < threshold {
            return (started.elapsed(), true);
        }
    }
    (started.elapsed(), false)
}

/// The broker pinned to one CPU and this tool, with every process it starts from then on, to
/// the others (`--pin-broker`), so that the gateway and the broker do not share cores. Dropping
/// it gives the broker back the CPUs it had.
pub struct Pinned {
    broker: String,
    before: String,
    /// `broker on CPU 0, the rest on 1`.
    pub described: String,
}

impl Pinned {
    /// Pins every thread of the broker to `cpu`, and every thread of this process to the other
    /// CPUs (threads and processes started later inherit that).
    pub fn apply(cpu: usize) -> anyhow::Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let rest: Vec<String> = (0..cpus).filter(|c| *c != cpu).map(|c| c.to_string()).collect();
        anyhow::ensure!(cpu < cpus && !rest.is_empty(), "--pin-broker {cpu}: this machine has CPUs 0 to {}, and the rest needs one", cpus - 1);
        let broker = broker_pid().ok_or_else(|| anyhow::anyhow!("--pin-broker: no beam.smp process on this machine"))?;
        // `pid 3003's current affinity mask: 3`
        let before = taskset(&["-p", &broker])?.rsplit(':').next().unwrap_or_default().trim().to_owned();
        let rest = rest.join(",");
        taskset(&["-a", "-p", "-c", &cpu.to_string(), &broker])?;
        let pinned = Self { broker, before, described: format!("broker on CPU {cpu}, the rest on {rest}") };
        taskset(&["-a", "-p", "-c", &rest, &std::process::id().to_string()])?;
        Ok(pinned)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Err(e) = taskset(&["-a", "-p", &self.before, &self.broker]) {
            eprintln!("warning: giving the broker back its CPUs (mask {}): {e:#}", self.before);
        }
    }
}

/// Runs `taskset` (util-linux) with `args`; its stdout.
fn taskset(args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new("taskset").args(args).output().map_err(|e| anyhow::anyhow!("running taskset: {e}"))?;
    anyhow::ensure!(output.status.success(), "taskset {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
