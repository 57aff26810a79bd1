//! `sluice-gateway`: configuration, telemetry, bind, then serve until SIGTERM or Ctrl-C.
//! `sluice-gateway health` probes a running instance (docker-compose's health check).

use std::process::ExitCode;

/// glibc's malloc and free took about 16% of a busy gateway's CPU (perf); with mimalloc,
/// PlaceOrder at 256 in flight went from 6,436 to 7,654 calls/s (docs/benchmarks.md). Built
/// with `no_thp`: transparent huge pages under its arenas raised peak RSS at 1,024 calls in
/// flight from 46 to 80 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let config = sluice_gateway::Config::from_env()?;
    if let Some(code) = sluice::ops::health_subcommand(config.ops_addr).await {
        return Ok(code);
    }
    // Whether it started or not, the last spans are exported before main returns.
    let telemetry = config.telemetry.clone();
    sluice::telemetry::traced(&telemetry, async {
        let shutdown = sluice::shutdown::Shutdown::on_signals();
        let gateway = sluice_gateway::Gateway::bind(config).await?;
        gateway.run(shutdown.clone()).await?;
        shutdown.wait().await;
        anyhow::Ok(())
    })
    .await??;
    Ok(ExitCode::SUCCESS)
}
