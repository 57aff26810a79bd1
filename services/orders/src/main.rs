//! `sluice-orders`: configuration, telemetry, then the service until SIGTERM or Ctrl-C.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = sluice_orders::config_from_env()?;
    let _telemetry = sluice::telemetry::init(&config.telemetry)?;
    let shutdown = sluice::shutdown::Shutdown::on_signals();
    sluice_orders::start(&config).await?.run(shutdown).await?;
    Ok(())
}
