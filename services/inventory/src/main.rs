//! `sluice-inventory`: configuration, telemetry, then the service until SIGTERM or Ctrl-C.
//! `sluice-inventory health` probes a running instance (docker-compose's health check).

use std::process::ExitCode;

/// mimalloc (without transparent huge pages), as in the gateway: less CPU per order end to
/// end than glibc's malloc (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<ExitCode> {
    let config = sluice_inventory::Config::from_env()?;
    if let Some(code) = sluice::ops::health_subcommand(config.service.ops_addr).await {
        return Ok(code);
    }
    let telemetry = sluice::telemetry::init(&config.service.telemetry)?;
    let served = async {
        let shutdown = sluice::shutdown::Shutdown::on_signals();
        let consumer = sluice_inventory::start(&config).await?;
        sluice::ops::run_service(consumer, config.service.ops_addr, shutdown).await.map_err(|e| anyhow::anyhow!(e))
    }
    .await;
    // Whether it started or not, before the runtime stops: the last spans are exported through it.
    telemetry.shutdown().await;
    served?;
    Ok(ExitCode::SUCCESS)
}
