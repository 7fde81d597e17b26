//! A started replication stream: CopyData frames both ways. The server sends XLogData (pgoutput
//! messages with their WAL positions) and keepalives; the client sends standby status updates, the
//! last one right before CopyDone so a clean stop loses no acknowledgement.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use crate::event::Lsn;

use super::client::{proto, server_error, Frame, ReplicationClient, ReplicationError};

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// One message of the replication stream.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// A pgoutput message; `wal_start` is the WAL position of the change it describes.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    /// The server's heartbeat; when `reply_requested` it expects a status update soon or it
    /// closes the connection after `wal_sender_timeout`.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// Silence from the server after which the stream asks it for a keepalive.
pub const PROBE_AFTER: Duration = Duration::from_secs(10);
/// Silence after which the connection is taken for dead (a half-open TCP connection: the peer
/// vanished without FIN or RST, and the kernel would only notice after many minutes).
pub const DEAD_AFTER: Duration = Duration::from_secs(30);

/// A started logical replication stream.
pub struct ReplicationStream {
    client: ReplicationClient,
    slot: String,
    /// The position the command last confirmed: what an automatic status update repeats (never
    /// anything newer, which is the command's to decide).
    last_confirmed: Lsn,
    /// When the last message of any kind came from the server.
    last_received: Instant,
    /// When a status update asking for a reply went out, if none came since.
    probe_sent: Option<Instant>,
    probe_after: Duration,
    dead_after: Duration,
}

impl ReplicationStream {
    pub(super) fn new(client: ReplicationClient, slot: &str, start: Lsn) -> Self {
        ReplicationStream {
            client,
            slot: slot.to_string(),
            last_confirmed: start,
            last_received: Instant::now(),
            probe_sent: None,
            probe_after: PROBE_AFTER,
            dead_after: DEAD_AFTER,
        }
    }

    /// The next message; `None` when the server ended the stream. Cancel-safe.
    ///
    /// Also watches the connection: after [`PROBE_AFTER`] without a message it sends a status
    /// update (with the last confirmed position) that asks for a reply, which a live server
    /// answers at once with a keepalive; after [`DEAD_AFTER`] without any message it ends with a
    /// transient I/O error, so the caller reconnects from its confirmed position.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        enum Woke {
            Frame(Result<Frame, ReplicationError>),
            Timer,
        }
        loop {
            if !self.client.write_buf.is_empty() {
                // A probe whose flush was cancelled.
                self.client.flush().await?;
            }
            let deadline = match self.probe_sent {
                None => self.last_received + self.probe_after,
                // A probe sent late (nobody polled the stream for a while) still gets its time.
                Some(sent) => (self.last_received + self.dead_after)
                    .max(sent + self.dead_after.saturating_sub(self.probe_after)),
            };
            let woke = tokio::select! {
                biased;
                frame = self.client.recv_frame() => Woke::Frame(frame),
                _ = tokio::time::sleep_until(deadline.into()) => Woke::Timer,
            };
            let frame = match woke {
                Woke::Frame(frame) => frame?,
                Woke::Timer if self.probe_sent.is_none() => {
                    tracing::debug!(silent_for = ?self.last_received.elapsed(), confirmed = %self.last_confirmed, "replication connection quiet; asking the server for a keepalive");
                    self.probe_sent = Some(Instant::now());
                    self.encode_status(self.last_confirmed, true)?;
                    self.client.flush().await?;
                    continue;
                }
                Woke::Timer => return Err(self.dead().await),
            };
            self.last_received = Instant::now();
            self.probe_sent = None;
            let msg = match frame {
                Frame::Other(m) => m,
                Frame::CopyBoth => continue,
            };
            match msg {
                Message::CopyData(body) => return parse_copy_data(body.into_bytes()).map(Some),
                Message::CopyDone | Message::CommandComplete(_) | Message::ReadyForQuery(_) => {
                    return Ok(None)
                }
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                Message::NoticeResponse(body) => super::client::log_notice(&body),
                Message::ParameterStatus(_) => {}
                _ => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message in replication stream".into(),
                    ))
                }
            }
        }
    }

    /// The connection is taken for dead. Its walsender would hold the slot until the server's
    /// `wal_sender_timeout` (a minute by default) and refuse the reconnect until then, so it is
    /// ended over a new connection first, if one can be made quickly.
    async fn dead(&mut self) -> ReplicationError {
        let silent = self.last_received.elapsed();
        tracing::warn!(silent_for = ?silent, slot = %self.slot, "no message from PostgreSQL on the replication connection, not even an answer to a keepalive request; taking the connection for dead");
        if let Some(pid) = self.client.backend_pid {
            let end = self.client.terminate_walsender(pid, &self.slot);
            match tokio::time::timeout(Duration::from_secs(10), end).await {
                Ok(Ok(true)) => {
                    tracing::info!(pid, slot = %self.slot, "ended the walsender of the dead connection")
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "could not end the walsender of the dead connection")
                }
                Err(_) => {
                    tracing::debug!("could not end the walsender of the dead connection in time")
                }
            }
        }
        ReplicationError::Io {
            endpoint: self.client.endpoint_name().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no message from the server for {}s, not even an answer to a keepalive request (half-open connection?)",
                    silent.as_secs()
                ),
            ),
        }
    }

    /// Standby status update: everything up to `confirmed` is safely handled, so the slot may
    /// forget it. The stream repeats this position in the status updates it sends by itself.
    pub async fn send_status(
        &mut self,
        confirmed: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        self.last_confirmed = confirmed;
        self.encode_status(confirmed, reply_requested)?;
        self.client.flush().await
    }

    fn encode_status(
        &mut self,
        confirmed: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
            - PG_EPOCH_OFFSET_MICROS;
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(confirmed.0); // written
        payload.put_u64(confirmed.0); // flushed: what the slot's confirmed_flush_lsn becomes
        payload.put_u64(confirmed.0); // applied
        payload.put_i64(now);
        payload.put_u8(u8::from(reply_requested));
        frontend::CopyData::new(payload.freeze())
            .map_err(proto)?
            .write(&mut self.client.write_buf);
        Ok(())
    }

    /// Clean end: the final status update first, then CopyDone, then waits briefly for the server
    /// to close its side so the position is persisted before the process exits.
    pub async fn finish(mut self, confirmed: Lsn) -> Result<(), ReplicationError> {
        self.send_status(confirmed, false).await?;
        frontend::copy_done(&mut self.client.write_buf);
        self.client.flush().await?;
        let drain = async {
            loop {
                match self.client.recv_frame().await? {
                    Frame::Other(Message::ReadyForQuery(_)) => return Ok(()),
                    Frame::Other(Message::ErrorResponse(body)) => return Err(server_error(&body)),
                    _ => {}
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), drain).await {
            Ok(r) => r,
            Err(_) => Err(ReplicationError::Protocol(
                "server did not end the stream within 10s of CopyDone".into(),
            )),
        }
    }
}

fn parse_copy_data(mut data: Bytes) -> Result<ReplicationMessage, ReplicationError> {
    let short = || ReplicationError::Protocol("truncated CopyData message".into());
    if data.is_empty() {
        return Err(short());
    }
    match data.get_u8() {
        b'w' => {
            if data.len() < 24 {
                return Err(short());
            }
            let wal_start = Lsn(data.get_u64());
            let wal_end = Lsn(data.get_u64());
            let _send_time = data.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data,
            })
        }
        b'k' => {
            if data.len() < 17 {
                return Err(short());
            }
            let wal_end = Lsn(data.get_u64());
            let _send_time = data.get_i64();
            Ok(ReplicationMessage::Keepalive {
                wal_end,
                reply_requested: data.get_u8() == 1,
            })
        }
        other => Err(ReplicationError::Protocol(format!(
            "unknown CopyData message type {other:#04x}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A stream whose server end the test plays, with short liveness times.
    fn stream(start: Lsn) -> (ReplicationStream, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let mut s = ReplicationStream::new(ReplicationClient::over(ours), "slot", start);
        s.probe_after = Duration::from_millis(100);
        s.dead_after = Duration::from_millis(400);
        (s, theirs)
    }

    /// Reads one standby status update: (flushed position, reply requested).
    async fn read_status(server: &mut DuplexStream) -> (u64, bool) {
        let mut frame = [0u8; 39];
        server.read_exact(&mut frame).await.unwrap();
        assert_eq!(frame[0], b'd');
        assert_eq!(u32::from_be_bytes(frame[1..5].try_into().unwrap()), 38);
        assert_eq!(frame[5], b'r');
        let written = u64::from_be_bytes(frame[6..14].try_into().unwrap());
        let flushed = u64::from_be_bytes(frame[14..22].try_into().unwrap());
        assert_eq!(written, flushed);
        (flushed, frame[38] == 1)
    }

    async fn send_keepalive(server: &mut DuplexStream, wal_end: u64) {
        let mut f = vec![b'd'];
        f.extend_from_slice(&(4u32 + 18).to_be_bytes());
        f.push(b'k');
        f.extend_from_slice(&wal_end.to_be_bytes());
        f.extend_from_slice(&0i64.to_be_bytes());
        f.push(0);
        server.write_all(&f).await.unwrap();
    }

    #[tokio::test]
    async fn a_quiet_server_is_asked_for_a_keepalive_with_the_last_confirmed_position() {
        let (mut s, mut server) = stream(Lsn(100));
        s.send_status(Lsn(200), false).await.unwrap();
        assert_eq!(read_status(&mut server).await, (200, false));
        let answer = tokio::spawn(async move {
            let probe = read_status(&mut server).await;
            send_keepalive(&mut server, 300).await;
            (probe, server)
        });
        match s.next().await.unwrap() {
            Some(ReplicationMessage::Keepalive { wal_end, .. }) => assert_eq!(wal_end, Lsn(300)),
            other => panic!("expected the keepalive, got {other:?}"),
        }
        let (probe, _server) = answer.await.unwrap();
        assert_eq!(
            probe,
            (200, true),
            "the probe repeats the confirmed position"
        );
    }

    #[tokio::test]
    async fn a_silent_server_is_a_transient_error_after_the_dead_time() {
        let (mut s, mut server) = stream(Lsn(100));
        let started = Instant::now();
        let err = s.next().await.unwrap_err();
        let took = started.elapsed();
        assert!(err.is_transient(), "{err}");
        assert!(
            err.to_string().contains("no message from the server"),
            "{err}"
        );
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // One probe, with the start position (nothing was confirmed since).
        assert_eq!(read_status(&mut server).await, (100, true));
        let mut more = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(50), server.read(&mut more))
                .await
                .is_err(),
            "exactly one probe"
        );
    }

    #[tokio::test]
    async fn watching_the_connection_survives_cancelled_calls() {
        let (mut s, mut server) = stream(Lsn(7));
        // As inside tokio::select!: every call is dropped after 30 ms.
        let started = Instant::now();
        let err = loop {
            match tokio::time::timeout(Duration::from_millis(30), s.next()).await {
                Err(_) => continue,
                Ok(Ok(m)) => panic!("unexpected {m:?}"),
                Ok(Err(e)) => break e,
            }
        };
        assert!(err.is_transient());
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(read_status(&mut server).await, (7, true));

        // And a message that arrives across cancelled calls is read whole.
        let (mut s, mut server) = stream(Lsn(7));
        let mut f = vec![b'd'];
        f.extend_from_slice(&(4u32 + 18).to_be_bytes());
        f.push(b'k');
        f.extend_from_slice(&9u64.to_be_bytes());
        server.write_all(&f).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(30), s.next())
            .await
            .is_err());
        server.write_all(&[0u8; 9]).await.unwrap();
        match s.next().await.unwrap() {
            Some(ReplicationMessage::Keepalive { wal_end, .. }) => assert_eq!(wal_end, Lsn(9)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn copy_data_is_bounds_checked() {
        assert!(parse_copy_data(Bytes::from_static(b"")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"w\0\0")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"k\0")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"z")).is_err());
        let mut k = vec![b'k'];
        k.extend_from_slice(&7u64.to_be_bytes());
        k.extend_from_slice(&0i64.to_be_bytes());
        k.push(1);
        match parse_copy_data(Bytes::from(k)).unwrap() {
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
            } => {
                assert_eq!(wal_end, Lsn(7));
                assert!(reply_requested);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
