//! `sluice-bench`: measures the platform on this machine and prints one table and one summary
//! line.
//!
//! It creates a fresh vhost, starts the four services and the gateway from the release
//! binaries (each with its own SQLite database in a temp dir), and runs, each for a fixed
//! duration after a warm-up:
//!
//! 1. the broker baseline (raw lapin, confirmed persistent publishes, no Sluice code);
//! 2. end to end: orders offered at a fixed rate until COMPLETED, seen on a tap;
//! 3. unary PlaceOrder through the gateway at several concurrencies (the services are stopped
//!    first, so they do not compete for the CPU; their queues still receive every order);
//! 4. `EventGateway/PublishStream` of `OrderCreated` events, one stream, several windows;
//! 5. the peak RSS of every process.
//!
//! Every scenario checks its own results, so a fast wrong answer prints FAIL and the exit code
//! is 1. Then it stops the processes with SIGTERM and deletes the vhost and the temp dir.
//!
//! ```sh
//! cargo build --release --workspace --bins && target/release/sluice-bench --duration 10s --warmup 2s
//! ```

mod baseline;
mod broker;
mod cpu;
mod e2e;
mod otlp;
mod platform;
mod report;
mod stream;
mod unary;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use baseline::Message;
use report::{Check, GatewayRun, Latency, Row, thousands};

/// Benchmarks the Sluice platform against the raw broker.
#[derive(Debug, Parser)]
#[command(name = "sluice-bench")]
struct Args {
    /// Measured time of each scenario (`10s`, `500ms`, `1m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured time before each scenario.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Where sluice-gateway and the sluice-<service> binaries are (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The broker, without a vhost.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672")]
    amqp: String,
    /// The RabbitMQ management API.
    #[arg(long, default_value = "http://127.0.0.1:15672")]
    rabbitmq_api: String,
    /// Confirms in flight in the broker baseline, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,100,1000")]
    windows: Vec<usize>,
    /// Confirm channels the baseline spreads its window over, one run each (with each window).
    /// The broker runs a channel in one Erlang process, which one publisher's channel can keep
    /// busy; the gateway publishes on one channel.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    baseline_channels: Vec<usize>,
    /// PlaceOrder callers in flight, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    concurrency: Vec<usize>,
    /// `EventGateway/Publish` callers in flight, one run each.
    #[arg(long, value_delimiter = ',', default_value = "16,256")]
    publish_concurrency: Vec<usize>,
    /// Bytes added to each unary Publish event (its customer id), to measure the gateway's
    /// memory with large events; 0 keeps them at about 100 bytes.
    #[arg(long, default_value_t = 0)]
    publish_padding: usize,
    /// Events awaiting their ack on one PublishStream, one run each.
    #[arg(long, value_delimiter = ',', default_value = "16,256")]
    stream_windows: Vec<usize>,
    /// Bytes added to each PublishStream event (its customer id), to measure the gateway's
    /// memory with large events; 0 keeps them at about 100 bytes.
    #[arg(long, default_value_t = 0)]
    stream_padding: usize,
    /// HTTP/2 connections to the gateway (at most one per caller).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Orders per second offered end to end. The default is 2 % above the target of 1,000
    /// completed per second: a platform that keeps up completes what it is offered, give or take
    /// the backlog's swing over the window, so at exactly 1,000/s the verdict would fall either
    /// side of 1,000 by chance. 2 % is also how much the backlog may grow and still be steady.
    #[arg(long, default_value_t = 1020.0)]
    e2e_rate: f64,
    /// Most PlaceOrder calls in flight end to end.
    #[arg(long, default_value_t = 256)]
    e2e_calls: usize,
    /// Longest wait for the end-to-end backlog to drain.
    #[arg(long, default_value = "180s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Keep the temp dir (databases, logs) after the run.
    #[arg(long)]
    keep: bool,
    /// Every process exports its spans over OTLP/gRPC, as in docker-compose, to a sink in this
    /// tool that counts them (without it, spans are made but not exported).
    #[arg(long)]
    otlp: bool,
    /// Pins the broker (every `beam.smp` thread) to this CPU, and this tool with the platform it
    /// starts to the other CPUs, for the run (`taskset`; needs the right to change the broker's
    /// affinity). The issue's numbers are of shared cores; this shows the gateway beside a
    /// broker that has a core of its own.
    #[arg(long)]
    pin_broker: Option<usize>,
    /// Scenarios to run (for profiling one of them); the summary judges only what ran.
    #[arg(long, value_delimiter = ',', default_value = "baseline,e2e,unary,publish,stream")]
    only: Vec<Scenario>,
}

/// A scenario of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Baseline,
    E2e,
    Unary,
    Publish,
    Stream,
}

fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, unit) = raw.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((raw, "s"), |i| raw.split_at(i));
    let value: f64 = number.parse().map_err(|_| format!("`{raw}` is not a duration like 10s, 500ms or 1m"))?;
    let seconds = match unit {
        "ms" => value / 1_000.0,
        "s" => value,
        "m" => value * 60.0,
        other => return Err(format!("unknown unit `{other}` (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// The run's temp dir, removed on drop unless `--keep`.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: removing {}: {e}", self.path.display());
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let outcome = tokio::select! {
        outcome = run(args) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sluice-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs a load generator (`generator()`'s future) on a thread of its own with a single-threaded
/// runtime, and waits for what it returns. On this tool's two-worker runtime the workers woke
/// each other for every call, and those thread switches were CPU taken from the cores the
/// broker and the platform share with the tool (docs/benchmarks.md). Every scenario's generator
/// runs this way, the baseline's raw publisher as much as the gRPC callers, so that the ratios
/// compare like with like.
pub async fn on_own_thread<T, F, Fut>(name: &str, generator: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let (done, outcome) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the load generator's runtime")
                .and_then(|runtime| runtime.block_on(generator()));
            let _ = done.send(outcome);
        })
        .context("starting the load generator's thread")?;
    outcome.await.context("the load generator's thread died")?
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(|_| "?".into(), |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// Runs every scenario; `Ok(false)` when a check failed.
async fn run(args: Args) -> anyhow::Result<bool> {
    let bin_dir = platform::bin_dir(args.bin_dir.as_deref())?;
    let broker = broker::Broker::new(&args.amqp, &args.rabbitmq_api)?;
    let version = broker.version().context("asking the management API for the broker version")?;
    eprintln!("RabbitMQ {version}; {} CPUs; load average {}", std::thread::available_parallelism().map_or(0, |n| n.get()), load_average());
    let vhost = broker.create_vhost()?;
    let dir = TempDir { path: std::env::temp_dir().join(&vhost.name), keep: args.keep };
    std::fs::create_dir_all(&dir.path).with_context(|| format!("creating {}", dir.path.display()))?;
    eprintln!("vhost {}, databases and logs in {}", vhost.name, dir.path.display());
    let pinned = args.pin_broker.map(cpu::Pinned::apply).transpose()?;
    if let Some(pinned) = &pinned {
        eprintln!("pinned: {}", pinned.described);
    }
    let sink = if args.otlp { Some(otlp::Sink::start().await?) } else { None };
    let started = Instant::now();
    let mut platform = platform::Platform::start(&bin_dir, &vhost.url(), &dir.path, sink.as_ref().map(|(_, addr)| format!("http://{addr}")))?;
    eprintln!("platform up in {:.1} s, gRPC on {}", started.elapsed().as_secs_f64(), platform.grpc_addr);

    let mut baselines = Vec::new();
    let runs = |scenario: Scenario| args.only.contains(&scenario);
    for queues in [1, 3].into_iter().filter(|_| runs(Scenario::Baseline)) {
        for &window in &args.windows {
            for &channels in &args.baseline_channels {
                eprintln!("broker baseline: {queues} queue(s), {window} in flight, {channels} channel(s)");
                settle().await;
                let usage = Spent::start(&platform, &sink);
                let (url, warmup, duration) = (vhost.url(), args.warmup, args.duration);
                let generator = move || async move { baseline::run(&url, window, channels, queues, Message::Plain, warmup, duration).await };
                baselines.push(on_own_thread("baseline", generator).await?);
                usage.report();
            }
        }
    }
    // The gateway's own messages, with the same routing, at the largest window: how much of the
    // distance to the ceiling is the message (its headers) rather than the gateway.
    if let Some(&window) = args.windows.iter().max().filter(|_| runs(Scenario::Baseline)) {
        eprintln!("broker baseline: 3 queues, {window} in flight, the gateway's order.created");
        settle().await;
        let usage = Spent::start(&platform, &sink);
        let (url, warmup, duration) = (vhost.url(), args.warmup, args.duration);
        let generator = move || async move { baseline::run(&url, window, 1, 3, Message::Gateway, warmup, duration).await };
        baselines.push(on_own_thread("baseline", generator).await?);
        usage.report();
    }
    let ceiling = |queues: usize, message: Message| {
        baselines.iter().filter(|b| b.queues == queues && b.message == message).map(|b| b.rate).fold(0.0, f64::max)
    };
    let (ceiling1, ceiling3, ceiling3_gateway) = (ceiling(1, Message::Plain), ceiling(3, Message::Plain), ceiling(3, Message::Gateway));

    let load = e2e::Load {
        rate: args.e2e_rate,
        max_calls: args.e2e_calls,
        connections: args.connections,
        warmup: args.warmup,
        duration: args.duration,
        drain_timeout: args.drain_timeout,
    };
    let mut e2e = None;
    if runs(Scenario::E2e) {
        eprintln!("end to end: {} orders/s offered", args.e2e_rate);
        settle().await;
        let usage = Spent::start(&platform, &sink);
        e2e = Some(e2e::run(platform.grpc_addr, &vhost, &load).await?);
        usage.report();
        let sizes = platform.batch_sizes()?;
        let sizes: Vec<String> = sizes.iter().map(|(queue, size)| format!("{queue} {size:.1}")).collect();
        eprintln!("  deliveries per transaction: {}", sizes.join(", "));
    } else {
        // The gateway learns the catalog's SKUs from inventory: one order before inventory stops.
        let mut client = unary::clients(platform.grpc_addr, 1).await?.remove(0);
        client.place_order(unary::an_order(0)).await.context("the warm-up order")?;
    }
    let retries: usize = platform::logged(&dir.path).iter().map(|(_, l)| l.retries).sum();
    let mut memory = platform.peak_rss();
    memory.retain(|(name, _)| *name != "gateway");
    for (name, ended) in platform.stop(&platform::SERVICES) {
        if ended != "exit 0" {
            eprintln!("warning: sluice-{name} stopped with {ended}");
        }
    }

    let order_created = vhost.bound_queues(baseline::EXCHANGE, "order.created")?;
    let connection = lapin::Connection::connect(&vhost.url(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut unaries = Vec::new();
    let mut publishes = Vec::new();
    let unary_runs = args.concurrency.iter().filter(|_| runs(Scenario::Unary)).map(|&c| (unary::Method::PlaceOrder, c));
    let publish = unary::Method::Publish { padding: args.publish_padding };
    let publish_runs = args.publish_concurrency.iter().filter(|_| runs(Scenario::Publish)).map(|&c| (publish, c));
    for (method, concurrency) in unary_runs.chain(publish_runs) {
        purge(&channel, &order_created).await?;
        eprintln!("unary {method:?}: {concurrency} in flight");
        settle().await;
        let usage = Spent::start(&platform, &sink);
        let (addr, connections, warmup, duration) = (platform.grpc_addr, args.connections, args.warmup, args.duration);
        let generator = move || unary::run(addr, method, concurrency, connections, warmup, duration);
        let result = on_own_thread("unary", generator).await?;
        usage.report();
        let check = delivered(&channel, &order_created, result.accepted, result.failed).await?;
        match method {
            unary::Method::PlaceOrder => unaries.push((concurrency, result, check)),
            unary::Method::Publish { .. } => publishes.push((concurrency, result, check)),
        }
    }
    let mut streams = Vec::new();
    for &window in args.stream_windows.iter().filter(|_| runs(Scenario::Stream)) {
        purge(&channel, &order_created).await?;
        eprintln!("PublishStream: {window} in flight");
        settle().await;
        let usage = Spent::start(&platform, &sink);
        let (addr, padding, warmup, duration) = (platform.grpc_addr, args.stream_padding, args.warmup, args.duration);
        let result = on_own_thread("stream", move || stream::run(addr, window, padding, warmup, duration)).await?;
        usage.report();
        let check = delivered(&channel, &order_created, result.accepted, result.failed).await?;
        streams.push((window, result, check));
    }
    let _ = connection.close(200, "done".into()).await;
    memory.extend(platform.peak_rss());
    drop(platform);
    if let Some((sink, _)) = &sink {
        let (total, by) = otlp::Sink::describe(&Default::default(), &sink.received());
        eprintln!("OTLP sink received {} spans in all ({by})", thousands(total as f64));
    }
    for (name, logged) in platform::logged(&dir.path) {
        eprintln!(
            "sluice-{name} logged {} warnings ({} handler retries) and {} errors",
            logged.warnings, logged.retries, logged.errors
        );
    }

    // The table: baseline, unary, streaming, end to end, memory.
    let mut rows = Vec::new();
    for b in &baselines {
        let top = if b.queues == 1 { ceiling1 } else { ceiling3 };
        let what = match b.message {
            Message::Plain => String::new(),
            Message::Gateway => format!(", gateway's message ({} B body + headers)", b.body_bytes),
        };
        rows.push(Row {
            scenario: format!(
                "broker baseline, {} quorum queue{}, {} in flight{}{what}",
                b.queues,
                if b.queues == 1 { "" } else { "s" },
                b.window,
                if b.channels == 1 { String::new() } else { format!(" on {} channels", b.channels) }
            ),
            rate: format!("{} msg/s", thousands(b.rate)),
            latency: Latency::of(&b.latency),
            errors: b.errors.to_string(),
            versus: match (b.message, b.queues, b.rate == top) {
                (Message::Gateway, _, _) => format!("{:.2}x ({:.2}x of 3q)", b.rate / ceiling1, b.rate / ceiling3.max(1.0)),
                (_, 1, true) => "ceiling".into(),
                (_, _, true) => format!("{:.2}x (3q ceiling)", b.rate / ceiling1),
                _ => format!("{:.2}x", b.rate / ceiling1),
            },
            check: b.check.clone(),
        });
    }
    let gateway_row = |scenario: String, unit: &str, run: &GatewayRun, check: &Check| Row {
        scenario,
        rate: format!("{} {unit}/s", thousands(run.rate)),
        latency: Latency::of(&run.latency),
        errors: errors(&run.errors),
        versus: if ceiling1 > 0.0 && ceiling3 > 0.0 { format!("{:.2}x (3q {:.2}x)", run.rate / ceiling1, run.rate / ceiling3) } else { "-".into() },
        check: check.clone(),
    };
    for (concurrency, u, check) in &unaries {
        rows.push(gateway_row(format!("PlaceOrder unary, {concurrency} in flight"), "orders", u, check));
    }
    let padded = if args.publish_padding > 0 { format!(" (+{} B)", thousands(args.publish_padding as f64)) } else { String::new() };
    for (concurrency, p, check) in &publishes {
        rows.push(gateway_row(format!("Publish OrderCreated{padded} unary, {concurrency} in flight"), "events", p, check));
    }
    for (window, st, check) in &streams {
        rows.push(gateway_row(format!("PublishStream OrderCreated, 1 stream, {window} in flight"), "events", st, check));
    }
    // The backlog's growth per second over the measured window; it "grows" beyond noise.
    let growth = |e2e: &e2e::EndToEnd| (e2e.backlog.1 as f64 - e2e.backlog.0 as f64) / args.duration.as_secs_f64();
    let grows = |growth: f64| growth > (args.e2e_rate * 0.02).max(5.0);
    // Steady: neither the backlog nor the service queue that grew the most grows (each service
    // queue takes about one message per order, so the same threshold applies).
    let steady = |e2e: &e2e::EndToEnd| !grows(growth(e2e)) && e2e.worst_queue(args.duration).is_none_or(|(_, growth)| !grows(growth));
    if let Some(e2e) = &e2e {
        let (before, after) = e2e.backlog;
        let growth = growth(e2e);
        let grows_by = |growth: f64| if grows(growth) { format!("GROWS {}/s", thousands(growth)) } else { "steady".into() };
        let queues = match e2e.worst_queue(args.duration) {
            Some((q, growth)) => format!(
                "; service queues: {} the most, {} -> {} ready ({})",
                q.queue,
                thousands(f64::from(q.start)),
                thousands(f64::from(q.end)),
                grows_by(growth)
            ),
            None => String::new(),
        };
        let backlog = format!(
            "{retries} handler retries; backlog {} -> {} ({}), drained in {:.1} s{queues}",
            thousands(before as f64),
            thousands(after as f64),
            grows_by(growth),
            e2e.drained_in.as_secs_f64()
        );
        let e2e_check = match &e2e.check {
            Check::Ok(what) => Check::Ok(format!("{what}; {backlog}")),
            Check::Fail(why) => Check::Fail(format!("{why}; {backlog}")),
            Check::NotRun => Check::NotRun,
        };
        rows.push(Row {
            scenario: format!("end to end to COMPLETED, {} offered/s (sent {})", thousands(args.e2e_rate), thousands(e2e.offered)),
            rate: format!("{} orders/s", thousands(e2e.completed_rate)),
            latency: Latency::of(&e2e.latency),
            errors: errors(&e2e.errors),
            versus: if ceiling1 > 0.0 { format!("{:.2}x", e2e.completed_rate / ceiling1) } else { "-".into() },
            check: e2e_check,
        });
    }
    let mut peak_mib = 0.0_f64;
    for (name, kib) in &memory {
        let (rate, check) = match kib {
            Ok(kib) => {
                let mib = *kib as f64 / 1024.0;
                peak_mib = peak_mib.max(mib);
                (format!("{mib:.1} MiB"), Check::NotRun)
            }
            Err(e) => ("?".into(), Check::Fail(format!("{e:#}"))),
        };
        rows.push(Row::note(format!("peak RSS (VmHWM) sluice-{name}"), rate, check));
    }
    report::print_table(&rows);

    let failed = rows.iter().filter(|r| r.check.failed()).count();
    // The targets are judged against the baseline with the gateway's own routing: every
    // `order.created` goes to 3 quorum queues, so the 3-queue run is what the broker alone can
    // do with the same messages. The 1-queue ratio is printed too.
    let best = |runs: &[(usize, GatewayRun, Check)]| runs.iter().map(|(_, r, _)| r.rate).fold(0.0, f64::max);
    let (best_unary, best_stream) = (best(&unaries), best(&streams));
    let confirm_p50 = |queues: usize| {
        // The fastest confirm of the runs at 16 in flight (on one channel or more).
        baselines.iter().filter(|b| b.queues == queues && b.window == 16).filter_map(|b| Latency::of(&b.latency)).map(|l| l.p50).min().unwrap_or(0)
    };
    let (confirm_p50_1, confirm_p50_3) = (confirm_p50(1), confirm_p50(3));
    let unary_p50 = unaries.iter().find(|(c, _, _)| *c == 16).and_then(|(_, u, _)| Latency::of(&u.latency)).map_or(0, |l| l.p50);
    let p50_ratio = |confirm: u64| unary_p50 as f64 / confirm.max(1) as f64;
    let (e2e_rate, e2e_steady) = e2e.as_ref().map_or((0.0, false), |e| (e.completed_rate, steady(e)));
    // Whether a target whose scenarios ran is met (the ones that did not run say so below).
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    // Beside the verdict, not instead of it: the ratio to what the broker does with the
    // gateway's own messages.
    let same_message = |rate: f64| format!("{:.2}x of {} msg/s with the gateway's message", rate / ceiling3_gateway.max(1.0), thousands(ceiling3_gateway));
    let baseline_ran = runs(Scenario::Baseline);
    let unary_ran = baseline_ran && runs(Scenario::Unary) && ceiling3 > 0.0;
    let stream_ran = baseline_ran && runs(Scenario::Stream) && ceiling3 > 0.0;
    // Only what ran is judged and printed; a target whose scenarios did not run (`--only`)
    // says so, rather than a ratio to a baseline that was never measured.
    let mut parts = vec![format!("checks {}", if failed == 0 { "all ok".to_owned() } else { format!("{failed} FAIL") })];
    parts.push(if unary_ran {
        format!(
            "unary best {} orders/s = {:.2}x the 3-queue ceiling {} msg/s (1-queue {:.2}x of {}; {}) (target >= 0.8x: {})",
            thousands(best_unary),
            best_unary / ceiling3,
            thousands(ceiling3),
            best_unary / ceiling1,
            thousands(ceiling1),
            same_message(best_unary),
            verdict(best_unary >= 0.8 * ceiling3),
        )
    } else {
        "unary (target >= 0.8x): not run".into()
    });
    // Publish has no target of its own (the unary target names PlaceOrder): shown when it ran.
    let best_publish = best(&publishes);
    if baseline_ran && best_publish > 0.0 && ceiling3 > 0.0 {
        parts.push(format!(
            "unary Publish best {} events/s = {:.2}x the 3-queue ceiling ({})",
            thousands(best_publish),
            best_publish / ceiling3,
            same_message(best_publish)
        ));
    }
    parts.push(if unary_ran && confirm_p50_3 > 0 {
        format!(
            "p50 at 16 in flight {} ms = {:.2}x the 3-queue confirm p50 {} ms (1-queue {:.2}x of {} ms) (target <= 1.5x: {})",
            report::ms(unary_p50),
            p50_ratio(confirm_p50_3),
            report::ms(confirm_p50_3),
            p50_ratio(confirm_p50_1),
            report::ms(confirm_p50_1),
            verdict(unary_p50 > 0 && p50_ratio(confirm_p50_3) <= 1.5),
        )
    } else {
        "p50 at 16 in flight (target <= 1.5x): not run".into()
    });
    parts.push(if stream_ran {
        format!(
            "stream best {} events/s = {:.2}x the 3-queue ceiling (1-queue {:.2}x; {}) (target >= 0.9x: {})",
            thousands(best_stream),
            best_stream / ceiling3,
            best_stream / ceiling1,
            same_message(best_stream),
            verdict(best_stream >= 0.9 * ceiling3),
        )
    } else {
        "stream (target >= 0.9x): not run".into()
    });
    parts.push(match &e2e {
        Some(_) => format!(
            "end to end {} orders/s, backlog and service queues {} (target >= 1,000, steady: {})",
            thousands(e2e_rate),
            if e2e_steady { "steady" } else { "grow" },
            verdict(e2e_rate >= 1_000.0 && e2e_steady),
        ),
        None => "end to end (target >= 1,000, steady): not run".into(),
    });
    parts.push(format!("peak RSS max {peak_mib:.1} MiB (target <= 64 MiB: {})", verdict(peak_mib > 0.0 && peak_mib <= 64.0)));
    if let Some(pinned) = &pinned {
        parts.push(format!("cores NOT shared: {}", pinned.described));
    }
    parts.push(format!("load average {}", load_average()));
    println!("SUMMARY: {}", parts.join(" | "));
    Ok(failed == 0)
}

/// What a scenario cost: CPU by process and, with `--otlp`, the spans exported meanwhile (the
/// batch processors export every 5 s or 512 spans, so a scenario's last spans may count in
/// the next one).
struct Spent<'a> {
    cpu: cpu::Usage,
    spans: Option<(&'a otlp::Sink, std::collections::BTreeMap<String, u64>)>,
}

impl<'a> Spent<'a> {
    fn start(platform: &platform::Platform, sink: &'a Option<(otlp::Sink, std::net::SocketAddr)>) -> Self {
        let spans = sink.as_ref().map(|(sink, _)| (sink, sink.received()));
        Self { cpu: cpu::Usage::start(&platform.pids()), spans }
    }

    fn report(&self) {
        eprintln!("  CPU {}", self.cpu.report());
        if let Some((sink, before)) = &self.spans {
            let (total, by) = otlp::Sink::describe(before, &sink.received());
            eprintln!("  spans exported: {} ({by})", thousands(total as f64));
        }
    }
}

/// Waits (at most 30 s) for the broker to finish the previous scenario's background work
/// (quorum queue log writes and compaction, deleted queues) before the next one starts.
async fn settle() {
    let (waited, quiet) = cpu::settle_broker(0.1, Duration::from_secs(30)).await;
    if quiet {
        eprintln!("  broker idle after {:.1} s", waited.as_secs_f64());
    } else {
        eprintln!("  warning: the broker was still busy after {:.0} s; measuring anyway", waited.as_secs_f64());
    }
}

/// Empties the queues bound to `order.created` before a run.
async fn purge(channel: &lapin::Channel, queues: &[String]) -> anyhow::Result<()> {
    for queue in queues {
        channel.queue_purge(lapin::types::ShortString::try_new(queue.as_str())?, Default::default()).await?;
    }
    Ok(())
}

/// Every queue bound to `order.created` holds one message per accepted order (and at most one
/// more per failed call, whose confirm may have come too late).
async fn delivered(channel: &lapin::Channel, queues: &[String], accepted: u64, failed: u64) -> anyhow::Result<Check> {
    if queues.is_empty() {
        return Ok(Check::Fail("no queue is bound to order.created".into()));
    }
    if accepted == 0 {
        return Ok(Check::Fail("nothing was accepted".into()));
    }
    for queue in queues {
        let count = u64::from(baseline::settled_count(channel, queue, accepted).await?);
        if count < accepted || count > accepted + failed {
            return Ok(Check::Fail(format!("{queue} holds {count}, {accepted} were accepted")));
        }
    }
    Ok(Check::Ok(format!("{} order.created queues hold all {} accepted", queues.len(), thousands(accepted as f64))))
}

/// `0`, or `12 (Unavailable 10, DeadlineExceeded 2)`.
fn errors(by_code: &std::collections::BTreeMap<String, u64>) -> String {
    let total: u64 = by_code.values().sum();
    if total == 0 {
        return "0".into();
    }
    let codes: Vec<String> = by_code.iter().map(|(code, n)| format!("{code} {n}")).collect();
    format!("{total} ({})", codes.join(", "))
}
