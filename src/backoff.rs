//! Exponential backoff with jitter for reconnects: 0.5 s doubling up to 30 s, so a long outage costs
//! few attempts and several relays do not retry in lockstep.

use std::time::Duration;

#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn new() -> Self {
        Backoff { attempt: 0 }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_pause(&mut self) -> Duration {
        let base = 500u64.saturating_mul(1 << self.attempt.min(6)).min(30_000);
        self.attempt = self.attempt.saturating_add(1);
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::from(d.subsec_nanos()) % (base / 4 + 1))
            .unwrap_or(0);
        Duration::from_millis(base + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new();
        let first = b.next_pause();
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_millis(625));
        for _ in 0..20 {
            b.next_pause();
        }
        assert!(b.next_pause() <= Duration::from_millis(37_500));
        b.reset();
        assert!(b.next_pause() <= Duration::from_millis(625));
    }
}
