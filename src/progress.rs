//! Backfill progress: rows done of total, rate and ETA. On a terminal one line rewritten in place;
//! otherwise (files, journald, CI) a plain log line every few seconds.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last: Instant,
    every: Duration,
    terminal: bool,
}

impl Progress {
    pub fn new(what: &'static str, total: Option<u64>) -> Self {
        let now = Instant::now();
        Progress {
            what,
            total,
            done: 0,
            started: now,
            last: now,
            every: Duration::from_secs(5),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        let now = Instant::now();
        let every = if self.terminal {
            Duration::from_millis(250)
        } else {
            self.every
        };
        if now.duration_since(self.last) >= every {
            self.last = now;
            self.report();
        }
    }

    /// The status line: `backfill 120000/1000000 rows (12.0%), 85000 rows/s, ETA 10s`.
    pub fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / secs;
        match self.total {
            Some(total) if total > 0 => {
                let left = total.saturating_sub(self.done) as f64;
                let eta = if rate > 0.0 {
                    format!("{:.0}s", left / rate)
                } else {
                    "?".into()
                };
                format!(
                    "{} {}/{} rows ({:.1}%), {:.0} rows/s, ETA {eta}",
                    self.what,
                    self.done,
                    total,
                    100.0 * self.done as f64 / total as f64,
                    rate
                )
            }
            _ => format!("{} {} rows, {:.0} rows/s", self.what, self.done, rate),
        }
    }

    fn report(&self) {
        if self.terminal {
            let mut err = std::io::stderr();
            let _ = write!(err, "\r{}\x1b[K", self.line());
            let _ = err.flush();
        } else {
            tracing::info!("{}", self.line());
        }
    }

    pub fn finish(&self) {
        if self.terminal {
            let _ = writeln!(std::io::stderr(), "\r{}\x1b[K", self.line());
        }
        tracing::info!(
            rows = self.done,
            seconds = format!("{:.1}", self.started.elapsed().as_secs_f64()),
            "{} done",
            self.what
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_share_and_eta() {
        let mut p = Progress::new("backfill", Some(1000));
        p.done = 250;
        let l = p.line();
        assert!(l.starts_with("backfill 250/1000 rows (25.0%)"), "{l}");
        assert!(l.contains("ETA"), "{l}");
        let p = Progress::new("backfill", None);
        assert!(p.line().starts_with("backfill 0 rows"));
    }
}
