//! `sluice-inventory`: configuration, telemetry, then the service until SIGTERM or Ctrl-C.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = sluice_inventory::Config::from_env()?;
    let _telemetry = sluice::telemetry::init(&config.service.telemetry)?;
    let shutdown = sluice::shutdown::Shutdown::on_signals();
    sluice_inventory::start(&config).await?.run(shutdown).await?;
    Ok(())
}
