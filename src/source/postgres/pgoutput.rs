//! Decoder for the `pgoutput` logical replication protocol (version 1).
//!
//! Input is untrusted bytes: every read is bounds-checked, every length field is checked against what
//! is left before anything is allocated, and malformed input is an error naming the message and the
//! offset, never a panic. Reference: PostgreSQL's "Logical Replication Message Formats".

use std::collections::HashMap;

use bytes::Bytes;

use crate::event::Lsn;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed pgoutput {message} message at byte {offset}: {reason}")]
pub struct DecodeError {
    pub message: &'static str,
    pub offset: usize,
    pub reason: String,
}

/// A column value as pgoutput sends it. NULL and "unchanged TOAST" are different things: the
/// first is a value, the second means "not sent, the old value still stands".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

impl Value {
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// What an UPDATE carries of the row before it. The two must not be confused: a key-only tuple has
/// NULL in every non-key column, which is not the old value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': the old replica identity (key columns); sent when the key changed.
    Key(Vec<Value>),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(Vec<Value>),
}

impl OldTuple {
    pub fn values(&self) -> &[Value] {
        match self {
            OldTuple::Key(v) | OldTuple::Full(v) => v,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    pub is_key: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutput {
    Begin {
        final_lsn: Lsn,
        commit_time: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
    },
    Origin {
        lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    Update {
        relation: u32,
        /// The old key ('K') or old row ('O', REPLICA IDENTITY FULL), when sent.
        old: Option<OldTuple>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: Vec<Value>,
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError {
            message: self.message,
            offset: self.pos,
            reason: reason.into(),
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(self.err(format!("needs {n} more bytes, {} left", self.remaining())));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }

    fn cstring(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.err("string without terminating NUL"))?;
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| self.err("string is not UTF-8"))?
            .to_string();
        self.pos += nul + 1;
        Ok(s)
    }

    /// A length-prefixed slice, sharing the input buffer (no copy).
    fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if self.remaining() < len {
            return Err(self.err(format!(
                "length {len} exceeds the {} bytes left",
                self.remaining()
            )));
        }
        let b = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(b)
    }

    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let n = self.u16()? as usize;
        // Each column takes at least one byte: a count beyond what is left is malformed, and
        // checking first keeps a forged count from reserving memory.
        if n > self.remaining() {
            return Err(self.err(format!(
                "tuple claims {n} columns, {} bytes left",
                self.remaining()
            )));
        }
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let v = match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.u32()? as usize;
                    Value::Text(self.bytes(len)?)
                }
                b'b' => {
                    let len = self.u32()? as usize;
                    Value::Binary(self.bytes(len)?)
                }
                k => return Err(self.err(format!("unknown column kind {k:#04x}"))),
            };
            values.push(v);
        }
        Ok(values)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(self.err(format!("{} trailing bytes", self.remaining())));
        }
        Ok(())
    }
}

/// Decodes one pgoutput message (the payload of an XLogData frame).
pub fn decode(data: &Bytes) -> Result<PgOutput, DecodeError> {
    let Some(&tag) = data.first() else {
        return Err(DecodeError {
            message: "empty",
            offset: 0,
            reason: "no message type byte".into(),
        });
    };
    let message = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        _ => {
            return Err(DecodeError {
                message: "unknown",
                offset: 0,
                reason: format!("unknown message type {tag:#04x}"),
            })
        }
    };
    let mut r = Reader {
        buf: data,
        pos: 1,
        message,
    };
    let out = match tag {
        b'B' => PgOutput::Begin {
            final_lsn: Lsn(r.u64()?),
            commit_time: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            PgOutput::Commit {
                commit_lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_time: r.i64()?,
            }
        }
        b'O' => PgOutput::Origin {
            lsn: Lsn(r.u64()?),
            name: r.cstring()?,
        },
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.cstring()?;
            let name = r.cstring()?;
            let replica_identity = r.u8()?;
            let n = r.u16()? as usize;
            if n > r.remaining() {
                return Err(r.err(format!("relation claims {n} columns")));
            }
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(Column {
                    name: r.cstring()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                    is_key: flags & 1 == 1,
                });
            }
            PgOutput::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => PgOutput::Type {
            oid: r.u32()?,
            namespace: r.cstring()?,
            name: r.cstring()?,
        },
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => PgOutput::Insert {
                    relation,
                    new: r.tuple()?,
                },
                k => return Err(r.err(format!("expected 'N', got {k:#04x}"))),
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                let values = r.tuple()?;
                old = Some(if kind == b'O' {
                    OldTuple::Full(values)
                } else {
                    OldTuple::Key(values)
                });
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(r.err(format!("expected 'N', got {kind:#04x}")));
            }
            PgOutput::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => PgOutput::Delete {
                    relation,
                    old: r.tuple()?,
                },
                k => return Err(r.err(format!("expected 'K' or 'O', got {k:#04x}"))),
            }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let options = r.u8()?;
            if n > r.remaining() / 4 {
                return Err(r.err(format!("truncate claims {n} relations")));
            }
            let mut relations = Vec::with_capacity(n);
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            PgOutput::Truncate {
                relations,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = Lsn(r.u64()?);
            let prefix = r.cstring()?;
            let len = r.u32()? as usize;
            PgOutput::Message {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.bytes(len)?,
            }
        }
        _ => unreachable!("tag checked above"),
    };
    r.finish()?;
    Ok(out)
}

/// Relations seen on this stream, by oid. pgoutput sends a Relation message before the first change
/// of a table in each session and again after its schema changes, so the cache is per connection.
#[derive(Debug, Default)]
pub struct RelationCache {
    relations: HashMap<u32, Relation>,
}

impl RelationCache {
    pub fn insert(&mut self, relation: Relation) {
        self.relations.insert(relation.oid, relation);
    }

    pub fn get(&self, oid: u32) -> Option<&Relation> {
        self.relations.get(&oid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_msg() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&16385u32.to_be_bytes());
        m.extend_from_slice(b"public\0user_logins\0");
        m.push(b'd');
        m.extend_from_slice(&2u16.to_be_bytes());
        m.push(1);
        m.extend_from_slice(b"id\0");
        m.extend_from_slice(&23u32.to_be_bytes());
        m.extend_from_slice(&(-1i32).to_be_bytes());
        m.push(0);
        m.extend_from_slice(b"username\0");
        m.extend_from_slice(&25u32.to_be_bytes());
        m.extend_from_slice(&(-1i32).to_be_bytes());
        m
    }

    #[test]
    fn decodes_relation_and_insert() {
        let rel = decode(&Bytes::from(relation_msg())).unwrap();
        let PgOutput::Relation(rel) = rel else {
            panic!("not a relation")
        };
        assert_eq!(rel.name, "user_logins");
        assert!(rel.columns[0].is_key);
        assert_eq!(rel.columns[1].name, "username");

        let mut ins = vec![b'I'];
        ins.extend_from_slice(&16385u32.to_be_bytes());
        ins.push(b'N');
        ins.extend_from_slice(&3u16.to_be_bytes());
        ins.push(b't');
        ins.extend_from_slice(&1u32.to_be_bytes());
        ins.push(b'7');
        ins.push(b'n');
        ins.push(b'u');
        let PgOutput::Insert { new, .. } = decode(&Bytes::from(ins)).unwrap() else {
            panic!("not an insert")
        };
        assert_eq!(
            new,
            vec![
                Value::Text(Bytes::from_static(b"7")),
                Value::Null,
                Value::UnchangedToast
            ]
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let full = relation_msg();
        for cut in 0..full.len() {
            assert!(
                decode(&Bytes::from(full[..cut].to_vec())).is_err(),
                "cut {cut}"
            );
        }
        // A forged column count must not allocate 65535 entries or read past the end.
        let mut ins = vec![b'I', 0, 0, 0, 1, b'N', 0xff, 0xff];
        assert!(decode(&Bytes::from(ins.clone())).is_err());
        // A forged value length.
        ins = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0xff, 0xff, 0xff, 0xff];
        assert!(decode(&Bytes::from(ins)).is_err());
        assert!(decode(&Bytes::from_static(b"Z")).is_err());
        let mut trailing = relation_msg();
        trailing.push(0);
        assert!(decode(&Bytes::from(trailing)).is_err());
    }
}
