//! Runs one Sluice process (a service or the gateway) as a child process of a test: the test
//! binary re-runs itself with `SLUICE_CHILD_SERVICE` set and `child::process` becomes that
//! process, configured from the environment exactly like its `sluice-<name>` binary.

use std::process::{Child, Command, Stdio};

use sluice::config::Env;
use sluice::shutdown::Shutdown;
use sluice::telemetry::TelemetryConfig;

/// Not a test: the body of a child process (ignored, and inert without its variable). Its
/// runtime is the one its binary uses: one thread for a service, a thread pool for the gateway.
#[test]
#[ignore = "runs only as a child process of another test"]
fn process() {
    let Ok(name) = std::env::var("SLUICE_CHILD_SERVICE") else { return };
    let runtime = match name.as_str() {
        "inventory" | "payment" | "notification" | "orders" => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        _ => tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build(),
    };
    runtime.expect("the child's runtime").block_on(run(name));
}

async fn run(name: String) {
    let telemetry = TelemetryConfig::from_source(&Env, &format!("sluice-{name}")).expect("telemetry configuration");
    match name.as_str() {
        "inventory" => {
            let config = sluice_inventory::Config::from_env().expect("inventory configuration");
            serve(&telemetry, config.service.ops_addr, sluice_inventory::start(&config)).await;
        }
        "payment" => {
            let config = sluice_payment::config_from_env().expect("payment configuration");
            serve(&telemetry, config.ops_addr, sluice_payment::start(&config)).await;
        }
        "notification" => {
            let config = sluice_notification::config_from_env().expect("notification configuration");
            serve(&telemetry, config.ops_addr, sluice_notification::start(&config)).await;
        }
        "orders" => {
            let config = sluice_orders::config_from_env().expect("orders configuration");
            serve(&telemetry, config.ops_addr, sluice_orders::start(&config)).await;
        }
        other => {
            let body = async {
                let shutdown = Shutdown::on_signals();
                match other {
                    "retry-trace" => crate::delivery::retried_and_dead_lettered_trace().await,
                    "gateway" => {
                        let config = sluice_gateway::Config::from_env().expect("gateway configuration");
                        let gateway = sluice_gateway::Gateway::bind(config).await.expect("gateway bind");
                        gateway.run(shutdown).await.expect("gateway run");
                    }
                    other => panic!("unknown child service {other}"),
                }
            };
            // Exporting, as the binary runs: the last spans are exported before the process exits.
            if telemetry.otlp_endpoint.is_some() {
                sluice::telemetry::traced(&telemetry, body).await.expect("telemetry");
            } else {
                sluice::telemetry::init_propagation();
                body.await;
            }
        }
    }
}

/// A service: exporting spans, exactly as its binary runs it (`service_main`); otherwise the
/// same with propagation only, so that a test's output stays quiet.
async fn serve(
    telemetry: &TelemetryConfig,
    ops_addr: Option<std::net::SocketAddr>,
    start: impl Future<Output = Result<sluice::bus::Consumer, sluice::bus::Error>>,
) {
    if telemetry.otlp_endpoint.is_some() {
        sluice::ops::service_main(telemetry, ops_addr, start).await.expect("the service");
        return;
    }
    sluice::telemetry::init_propagation();
    let shutdown = Shutdown::on_signals();
    let consumer = start.await.expect("start");
    sluice::ops::run_service(consumer, ops_addr, shutdown).await.expect("run");
}

/// Spawns `name` as a child process with `env`. Its output goes to `stdout` (or nowhere,
/// unless `TEST_LOG` is set). The process is killed when the returned value is dropped, so a
/// failing test leaves none behind.
pub fn spawn(name: &str, env: &[(String, String)], stdout: Option<Stdio>) -> Process {
    let quiet = std::env::var_os("TEST_LOG").is_none();
    let inherit_or_null = || if quiet { Stdio::null() } else { Stdio::inherit() };
    Command::new(std::env::current_exe().expect("the test binary"))
        .args(["child::process", "--exact", "--ignored", "--nocapture", "--test-threads", "1", "-q"])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("SLUICE_CHILD_SERVICE", name)
        .stdout(stdout.unwrap_or_else(inherit_or_null))
        .stderr(inherit_or_null())
        .spawn()
        .map(Process)
        .unwrap_or_else(|e| panic!("spawning the {name} process: {e}"))
}

/// A child process, killed (SIGKILL) when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Asks a child to stop as SIGTERM does in production, and waits for it.
pub fn terminate(child: &mut Process) {
    let _ = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status();
    let _ = child.0.wait();
}
