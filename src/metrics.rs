//! Prometheus text-format metrics and the small HTTP endpoint that serves them (`--metrics-addr`).
//!
//! A handful of atomics read by a hand-written exporter: the relay needs counters and gauges, not a
//! metrics framework, and every component stays free of any metrics dependency (the commands count).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Time spent, kept in microseconds, exported in seconds.
#[derive(Clone, Default)]
pub struct Seconds(Arc<AtomicU64>);

impl Seconds {
    pub fn record(&self, d: std::time::Duration) {
        self.0.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

enum Value {
    Counter(Counter),
    Gauge(Gauge),
    Seconds(Seconds),
}

struct Entry {
    name: String,
    help: &'static str,
    value: Value,
}

/// The metrics of one process.
#[derive(Clone, Default)]
pub struct Registry {
    entries: Arc<Mutex<Vec<Entry>>>,
}

impl Registry {
    fn push(&self, name: &str, help: &'static str, value: Value) {
        if let Ok(mut e) = self.entries.lock() {
            e.push(Entry {
                name: format!("cdc_relay_{name}"),
                help,
                value,
            });
        }
    }

    pub fn counter(&self, name: &str, help: &'static str) -> Counter {
        let c = Counter::default();
        self.push(name, help, Value::Counter(c.clone()));
        c
    }

    pub fn gauge(&self, name: &str, help: &'static str) -> Gauge {
        let g = Gauge::default();
        self.push(name, help, Value::Gauge(g.clone()));
        g
    }

    pub fn seconds(&self, name: &str, help: &'static str) -> Seconds {
        let s = Seconds::default();
        self.push(name, help, Value::Seconds(s.clone()));
        s
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(entries) = self.entries.lock() else {
            return out;
        };
        for e in entries.iter() {
            let (kind, value) = match &e.value {
                Value::Counter(c) => ("counter", c.get().to_string()),
                Value::Gauge(g) => ("gauge", g.get().to_string()),
                Value::Seconds(s) => (
                    "counter",
                    format!("{:.6}", s.0.load(Ordering::Relaxed) as f64 / 1e6),
                ),
            };
            let _ = writeln!(
                out,
                "# HELP {} {}\n# TYPE {} {kind}\n{} {value}",
                e.name, e.help, e.name, e.name
            );
        }
        out
    }

    /// Serves `GET /metrics` on `addr` until the process ends.
    pub async fn serve(self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                let registry = self.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut n = 0;
                    // Read the request head (bounded); the body, if any, is ignored.
                    while n < buf.len() {
                        match tokio::time::timeout(
                            std::time::Duration::from_secs(5),
                            sock.read(&mut buf[n..]),
                        )
                        .await
                        {
                            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                            Ok(Ok(k)) => n += k,
                        }
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    let head = String::from_utf8_lossy(&buf[..n]);
                    let response = if head.starts_with("GET /metrics ")
                        || head.starts_with("GET /metrics?")
                    {
                        let body = registry.render();
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_string()
                    };
                    let _ = sock.write_all(response.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Ok(local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_the_text_format() {
        let r = Registry::default();
        let c = r.counter("events_total", "Events.");
        let g = r.gauge("lag_bytes", "Lag.");
        c.add(3);
        g.set(-2);
        let addr = r
            .clone()
            .serve("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"));
        assert!(body.contains("# TYPE cdc_relay_events_total counter\ncdc_relay_events_total 3"));
        assert!(body.contains("cdc_relay_lag_bytes -2"));
    }
}
