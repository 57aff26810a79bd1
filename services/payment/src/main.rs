//! `sluice-payment`: configuration, telemetry, then the service until SIGTERM or Ctrl-C.
//! `sluice-payment health` probes a running instance (docker-compose's health check).

use std::process::ExitCode;

/// mimalloc (without transparent huge pages), as in the gateway: less CPU per order end to
/// end than glibc's malloc (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<ExitCode> {
    let config = sluice_payment::config_from_env()?;
    if let Some(code) = sluice::ops::health_subcommand(config.ops_addr).await {
        return Ok(code);
    }
    // Until SIGTERM or Ctrl-C; the last spans are exported before main returns.
    sluice::ops::service_main(&config.telemetry, config.ops_addr, sluice_payment::start(&config)).await.map_err(|e| anyhow::anyhow!(e))?;
    Ok(ExitCode::SUCCESS)
}
