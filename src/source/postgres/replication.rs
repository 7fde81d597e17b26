//! A started replication stream: CopyData frames both ways. The server sends XLogData (pgoutput
//! messages with their WAL positions) and keepalives; the client sends standby status updates, the
//! last one right before CopyDone so a clean stop loses no acknowledgement.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// A started logical replication stream.
pub struct ReplicationStream {
    client: ReplicationClient,
}

impl ReplicationStream {
    pub(super) fn new(client: ReplicationClient) -> Self {
        ReplicationStream { client }
    }

    /// The next message; `None` when the server ended the stream. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        loop {
            let msg = match self.client.recv_frame().await? {
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

    /// Standby status update: everything up to `confirmed` is safely handled, so the slot may
    /// forget it.
    pub async fn send_status(
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
        self.client.flush().await
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
