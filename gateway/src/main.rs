//! `sluice-gateway`: configuration, telemetry, bind, then serve until SIGTERM or Ctrl-C.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = sluice_gateway::Config::from_env()?;
    let _telemetry = sluice::telemetry::init(&config.telemetry)?;
    let shutdown = sluice::shutdown::Shutdown::on_signals();
    let gateway = sluice_gateway::Gateway::bind(config).await?;
    gateway.run(shutdown).await?;
    Ok(())
}
