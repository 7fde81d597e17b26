//! Formatting an error with its chain of causes. Imports nothing of the relay, so every component
//! may use it without depending on another.

/// The error and its causes, each told once: a failed TLS handshake then says why ("invalid peer
/// certificate: UnknownIssuer") instead of only hyper's "client error (Connect)".
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}
