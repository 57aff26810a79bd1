//! What a scenario reports (a rate, latency percentiles, errors, a self-check) and the one
//! table every scenario is printed in.

use std::time::Duration;

use hdrhistogram::Histogram;

/// What one run through the gateway measured (unary calls or a stream's events).
pub struct GatewayRun {
    /// Calls answered OK (or events acked as confirmed) inside the measured window, per second.
    pub rate: f64,
    pub latency: Histogram<u64>,
    /// Failed calls (or refused events) inside the measured window, by gRPC code.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Every OK answer or confirmed event, warm-up included.
    pub accepted: u64,
    /// Every failure, warm-up included.
    pub failed: u64,
}

/// Latencies in microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

/// Records `elapsed` (saturating at the histogram's bound).
pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).clamp(1, 600_000_000);
    histogram.saturating_record(micros);
}

/// Percentiles of one latency histogram, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Latency {
    /// `None` when nothing was recorded.
    pub fn of(histogram: &Histogram<u64>) -> Option<Self> {
        (!histogram.is_empty()).then(|| Self {
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            max: histogram.max(),
        })
    }
}

/// A scenario's verdict on its own results.
#[derive(Debug, Clone)]
pub enum Check {
    Ok(String),
    Fail(String),
    NotRun,
}

impl Check {
    pub fn failed(&self) -> bool {
        matches!(self, Check::Fail(_))
    }

    fn text(&self) -> String {
        match self {
            Check::Ok(what) if what.is_empty() => "ok".into(),
            Check::Ok(what) => format!("ok: {what}"),
            Check::Fail(why) => format!("FAIL: {why}"),
            Check::NotRun => "-".into(),
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub rate: String,
    pub latency: Option<Latency>,
    pub errors: String,
    pub versus: String,
    pub check: Check,
}

impl Row {
    /// A row that only carries text (n/a scenarios, memory).
    pub fn note(scenario: impl Into<String>, rate: impl Into<String>, check: Check) -> Self {
        Self { scenario: scenario.into(), rate: rate.into(), latency: None, errors: "-".into(), versus: "-".into(), check }
    }
}

/// `12345.6` → `12,346`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Microseconds as milliseconds with two decimals.
pub fn ms(micros: u64) -> String {
    format!("{:.2}", micros as f64 / 1_000.0)
}

/// Prints the table, columns padded to their widest cell.
pub fn print_table(rows: &[Row]) {
    let header = ["scenario", "throughput", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors", "vs baseline", "check"];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|row| {
            let l = |f: fn(&Latency) -> u64| row.latency.as_ref().map_or_else(|| "-".to_owned(), |l| ms(f(l)));
            [
                row.scenario.clone(),
                row.rate.clone(),
                l(|l| l.p50),
                l(|l| l.p90),
                l(|l| l.p99),
                l(|l| l.max),
                row.errors.clone(),
                row.versus.clone(),
                row.check.text(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |row: &[String]| {
        let parts: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| if i == 0 || i == 8 { format!("{cell:<w$}") } else { format!("{cell:>w$}") })
            .collect();
        format!("| {} |", parts.join(" | "))
    };
    println!("{}", line(&header.map(str::to_owned)));
    let rule: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(i, w)| if i == 0 || i == 8 { format!(":{}", "-".repeat(w + 1)) } else { format!("{}:", "-".repeat(w + 1)) })
        .collect();
    println!("|{}|", rule.join("|"));
    for row in &cells {
        println!("{}", line(row));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(12_345.6), "12,346");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }
}
