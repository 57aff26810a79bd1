//! `sluice`: the operator's command line. `sluice dlq list|show|replay|purge` works on
//! dead-letter queues through [`sluice::bus::dlq`]; this file only parses arguments, reads the
//! configuration and prints results (logs go to stderr, results to stdout).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use sluice::bus::dlq::{DeadLetters, Selection};
use sluice::config::{BusConfig, Env, Source, redact};

/// Default RabbitMQ management API, used by `dlq list` without queue names.
const DEFAULT_RABBITMQ_API: &str = "http://127.0.0.1:15672";

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "Operate a Sluice platform")]
struct Cli {
    /// Broker URL, vhost included [default: $SLUICE_AMQP_URL, else amqp://guest:guest@127.0.0.1:5672/%2f]
    #[arg(long, global = true, value_name = "URL")]
    amqp_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Dead-letter queues (`<queue>.dlq`): the messages consumers gave up on.
    #[command(subcommand)]
    Dlq(Dlq),
}

#[derive(Debug, Subcommand)]
enum Dlq {
    /// Dead-letter queues that hold messages, with their counts.
    ///
    /// Prints `<queue>\t<count>` for every dead-letter queue of the vhost that holds messages,
    /// found through the RabbitMQ management API; or, given queue names, for those queues
    /// (empty ones included), without the management API.
    List {
        /// Dead-letter queues to count, e.g. `inventory.reserve-stock.dlq`.
        queues: Vec<String>,
        /// Management API [default: $SLUICE_RABBITMQ_API, else http://127.0.0.1:15672]
        #[arg(long, value_name = "URL")]
        rabbitmq_api: Option<String>,
    },
    /// Prints the messages at the head of a dead-letter queue as JSON lines, leaving them there.
    Show {
        /// The dead-letter queue.
        queue: String,
        /// At most this many messages.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Sends messages back to the queue they failed in, then removes them from the dead-letter queue.
    Replay {
        /// The dead-letter queue.
        queue: String,
        #[command(flatten)]
        which: Which,
    },
    /// Deletes every message of a dead-letter queue.
    Purge {
        /// The dead-letter queue.
        queue: String,
    },
}

/// Which messages `dlq replay` sends back: exactly one of the two.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Which {
    /// Only the messages with this message_id (event id).
    #[arg(long, value_name = "ID")]
    message_id: Option<String>,
    /// Every message in the queue.
    #[arg(long)]
    all: bool,
}

/// The environment, with `--amqp-url` taking the place of `SLUICE_AMQP_URL`.
struct Settings<'a> {
    amqp_url: Option<&'a str>,
}

impl Source for Settings<'_> {
    fn get(&self, name: &str) -> Option<String> {
        match (name, self.amqp_url) {
            ("SLUICE_AMQP_URL", Some(url)) => Some(url.to_owned()),
            _ => Env.get(name),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs();
    match dlq(cli).await {
        Ok(code) => code,
        Err(error) => {
            // The command's own answer, on stderr: `error: what failed: why`.
            eprintln!("error: {}", render(&error));
            ExitCode::FAILURE
        }
    }
}

async fn dlq(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings { amqp_url: cli.amqp_url.as_deref() };
    let config = BusConfig::from_source(&settings).context("reading the configuration")?;
    let Command::Dlq(command) = cli.command;
    let dead_letters = DeadLetters::connect(&config)
        .await
        .with_context(|| format!("connecting to {}", redact(&config.url)))?;
    let result = run(&dead_letters, command, &settings).await;
    dead_letters.close().await;
    result
}

async fn run(dead_letters: &DeadLetters, command: Dlq, settings: &Settings<'_>) -> anyhow::Result<ExitCode> {
    match command {
        Dlq::List { queues, rabbitmq_api } => {
            let depths = if queues.is_empty() {
                let api = rabbitmq_api
                    .or_else(|| settings.get("SLUICE_RABBITMQ_API"))
                    .unwrap_or_else(|| DEFAULT_RABBITMQ_API.to_owned());
                dead_letters.list(&api).await.context("listing dead-letter queues")?
            } else {
                dead_letters.depths(&queues).await.context("counting dead letters")?
            };
            for depth in depths {
                println!("{}\t{}", depth.queue, depth.messages);
            }
        }
        Dlq::Show { queue, limit } => {
            for letter in dead_letters.show(&queue, limit).await.with_context(|| format!("reading {queue}"))? {
                println!("{}", serde_json::to_string(&letter)?);
            }
        }
        Dlq::Replay { queue, which: Which { message_id, all: _ } } => {
            let selection = match &message_id {
                Some(id) => Selection::MessageId(id.clone()),
                None => Selection::All,
            };
            let report = dead_letters.replay(&queue, &selection).await.with_context(|| format!("replaying {queue}"))?;
            println!("replayed {} message(s) from {queue}", report.replayed);
            for skipped in &report.skipped {
                println!("skipped {}: {}", skipped.message_id.as_deref().unwrap_or("(no message_id)"), skipped.reason);
            }
            if !report.skipped.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
            if let (Some(id), 0) = (&message_id, report.replayed) {
                anyhow::bail!("no message with message_id {id} in {queue}");
            }
        }
        Dlq::Purge { queue } => {
            let purged = dead_letters.purge(&queue).await.with_context(|| format!("purging {queue}"))?;
            println!("purged {purged} message(s) from {queue}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `context: cause: cause`, leaving out causes that the message before already quotes
/// (`bus::Error` displays its source).
fn render(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Human-readable logs on stderr, `warn` and up unless `RUST_LOG` says otherwise. lapin's
/// own logs are off by default: every failure it reports reaches the user as the command's
/// error.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin=off"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
