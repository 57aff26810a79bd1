//! docker-compose.yml cannot run here (no Docker engine), so its structure is checked instead:
//! every process of the platform is there, built from this workspace's one Dockerfile, started
//! only once RabbitMQ is healthy, health-checked, and configured with variables the binaries
//! actually read.

use std::{collections::BTreeSet, time::Duration};

use serde_yaml_ng::Value;
use sluice::bus::handler::DRAIN_TIMEOUT;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn compose() -> Value {
    let text = std::fs::read_to_string(format!("{ROOT}/docker-compose.yml")).expect("docker-compose.yml");
    let mut value: Value = serde_yaml_ng::from_str(&text).expect("docker-compose.yml is YAML");
    value.apply_merge().expect("merge keys resolve");
    // Anchors merged one level deep (environment, depends_on) need a second pass.
    if let Some(services) = value.get_mut("services").and_then(Value::as_mapping_mut) {
        for (_, service) in services.iter_mut() {
            service.apply_merge().expect("nested merge keys resolve");
            for key in ["environment", "depends_on", "healthcheck"] {
                if let Some(inner) = service.get_mut(key) {
                    inner.apply_merge().expect("nested merge keys resolve");
                }
            }
        }
    }
    value
}

fn strs(value: &Value) -> Vec<&str> {
    value.as_sequence().map(|s| s.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

#[test]
fn compose_runs_every_process_after_a_healthy_broker() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    let expected: BTreeSet<&str> = ["rabbitmq", "jaeger", "gateway", "inventory", "payment", "notification", "orders"].into();
    assert_eq!(names, expected);

    let rabbitmq = &compose["services"]["rabbitmq"];
    assert!(rabbitmq["image"].as_str().unwrap().contains("management"), "the management image");
    assert_eq!(strs(&rabbitmq["healthcheck"]["test"]), ["CMD", "rabbitmq-diagnostics", "-q", "ping"]);
    let jaeger = &compose["services"]["jaeger"];
    let ports = strs(&jaeger["ports"]);
    assert!(ports.contains(&"4317:4317") && ports.contains(&"16686:16686"), "{ports:?}");

    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).expect("Dockerfile");
    for name in ["gateway", "inventory", "payment", "notification", "orders"] {
        let service = &compose["services"][name];
        let binary = format!("sluice-{name}");
        assert_eq!(service["build"]["context"].as_str(), Some("."), "{name} is built from the workspace");
        assert_eq!(service["build"]["dockerfile"].as_str(), Some("Dockerfile"));
        assert_eq!(strs(&service["command"]), [binary.as_str()], "{name} runs its own binary");
        assert!(dockerfile.contains(&format!("target/release/{binary}")), "the Dockerfile ships {binary}");
        assert!(
            std::path::Path::new(&format!("{ROOT}/{}/src/main.rs", if name == "gateway" { "gateway".into() } else { format!("services/{name}") })).exists()
        );
        assert_eq!(service["depends_on"]["rabbitmq"]["condition"].as_str(), Some("service_healthy"), "{name} waits for RabbitMQ");
        assert_eq!(strs(&service["healthcheck"]["test"]), ["CMD", binary.as_str(), "health"], "{name} is health-checked");
        // Docker kills a container 10 s after SIGTERM unless told otherwise: too soon for a
        // shutdown that lets in-flight handlers finish.
        let grace = service["stop_grace_period"].as_str().and_then(|g| g.strip_suffix('s')).and_then(|s| s.parse().ok()).map(Duration::from_secs);
        let needed = DRAIN_TIMEOUT + Duration::from_secs(15);
        assert!(grace.is_some_and(|g| g >= needed), "{name}: stop_grace_period {grace:?}, at least {needed:?} (in-flight handlers, outbox flush, closes, span export)");
        let env = &service["environment"];
        assert_eq!(env["SLUICE_AMQP_URL"].as_str(), Some("amqp://guest:guest@rabbitmq:5672/%2f"));
        assert_eq!(env["OTEL_EXPORTER_OTLP_ENDPOINT"].as_str(), Some("http://jaeger:4317"));
        assert_eq!(env["OTEL_SERVICE_NAME"].as_str(), Some(binary.as_str()), "each process has its own service name");
        let ops = env["SLUICE_OPS_ADDR"].as_str().expect("an ops address");
        assert!(ops.parse::<std::net::SocketAddr>().is_ok(), "{ops}");
        if name != "gateway" {
            let url = env["DATABASE_URL"].as_str().expect("a database per service");
            assert!(url.starts_with("sqlite:///var/lib/sluice/"), "{url}");
            assert!(strs(&service["volumes"]).iter().any(|v| v.ends_with(":/var/lib/sluice")), "{name} keeps its database");
        }
        // The values compose sets are accepted by the configuration the binary reads.
        let source: Vec<(String, String)> = env
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str().unwrap().to_owned(), v.as_str().map(str::to_owned).unwrap_or_else(|| format!("{v:?}"))))
            .collect();
        let lookup = Lookup(source);
        if name == "gateway" {
            sluice_gateway::Config::from_source(&lookup).expect("gateway configuration");
        } else {
            sluice::config::ServiceConfig::from_source(&lookup, name, 1).expect("service configuration");
        }
    }
    let gateway = &compose["services"]["gateway"];
    assert!(strs(&gateway["ports"]).contains(&"50051:50051"));
    for dependency in ["inventory", "orders"] {
        assert_eq!(gateway["depends_on"][dependency]["condition"].as_str(), Some("service_healthy"));
    }
}

struct Lookup(Vec<(String, String)>);

impl sluice::config::Source for Lookup {
    fn get(&self, name: &str) -> Option<String> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
}
