//! The replication connection, written on `postgres-protocol`.
//!
//! Why not a crate: upstream `tokio-postgres` has no CopyBoth (replication) support and the fork that
//! does is not on crates.io; `pgwire-replication` drops the last standby status update on shutdown
//! (acknowledged rows are replayed after a clean stop) and has no way to send one before CopyDone.
//! What replication needs from the wire is small: startup and SCRAM, simple queries for the
//! replication commands, and CopyData frames in both directions. Owning it lets a clean shutdown send
//! the final confirmed position and keeps every length field bounded (see docs/architecture.md).

use std::time::Duration;

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{ErrorResponseBody, Message, NoticeResponseBody};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::{Host, LoadBalanceHosts, TargetSessionAttrs};

use crate::event::Lsn;

use super::replication::ReplicationStream;

/// Largest backend message accepted. PostgreSQL caps a single datum at 1 GB; a length field beyond this
/// is corruption or a hostile peer, and must not turn into an allocation.
const MAX_MESSAGE_LEN: usize = 1 << 30;

trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication connection to {endpoint}: {source}")]
    Io {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("PostgreSQL {severity} {code}: {message}{}{}", .detail.as_deref().map(|d| format!(" (detail: {d})")).unwrap_or_default(), .hint.as_deref().map(|h| format!(" (hint: {h})")).unwrap_or_default())]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("PostgreSQL authentication: {0}")]
    Auth(String),
    #[error("invalid connection settings: {0}")]
    Config(String),
    #[error("TLS to PostgreSQL: {0}")]
    Tls(String),
    /// The server answered but is not the kind `target_session_attrs` asks for (a standby when a
    /// primary is wanted): during a failover, until the standby is promoted.
    #[error("PostgreSQL at {endpoint}: {reason}")]
    WrongSessionKind { endpoint: String, reason: String },
    /// Every server of a multi-host URL failed; each with its own error, in the order tried.
    #[error("no server of the PostgreSQL URL could be used: {}", .0.iter().map(|(server, e)| format!("{server}: {e}")).collect::<Vec<_>>().join("; "))]
    NoServer(Vec<(String, ReplicationError)>),
}

impl ReplicationError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether retrying the connection later may succeed (network trouble, server restarting,
    /// walsender terminated, slot still held by a dying walsender).
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Io { .. } | ReplicationError::WrongSessionKind { .. } => true,
            // One server that may come back (down, restarting, not yet promoted) is worth waiting for.
            ReplicationError::NoServer(errors) => errors.iter().any(|(_, e)| e.is_transient()),
            ReplicationError::Server { code, .. } => {
                // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now,
                // 55006 object_in_use (slot active for another pid), 08* connection exceptions.
                matches!(
                    code.as_str(),
                    "57P01" | "57P02" | "57P03" | "55006" | "53300"
                ) || code.starts_with("08")
            }
            _ => false,
        }
    }
}

/// SSLRequest, then TLS if the server agrees (and the mode allows plain text if it does not).
async fn negotiate_tls(
    mut tcp: TcpStream,
    params: &ConnectParams,
    server: &Server,
) -> Result<Box<dyn Socket>, ReplicationError> {
    use super::tls::SslMode;
    let Some(config) = params.tls.client_config() else {
        return Ok(Box::new(tcp));
    };
    let io = |source| ReplicationError::Io {
        endpoint: server.endpoint(),
        source,
    };
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await.map_err(io)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io)?;
    match answer[0] {
        b'S' => {
            let name = super::tls::server_name(&server.host).map_err(ReplicationError::Tls)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| ReplicationError::Tls(e.to_string()))?;
            Ok(Box::new(stream))
        }
        b'N' if params.tls.mode == SslMode::Prefer => Ok(Box::new(tcp)),
        b'N' => Err(ReplicationError::Tls(format!(
            "the server at {} does not accept TLS, and sslmode {:?} requires it",
            server.endpoint(),
            params.tls.mode
        ))),
        other => Err(ReplicationError::Protocol(format!(
            "unexpected answer {other:#04x} to SSLRequest"
        ))),
    }
}

pub(super) fn server_error(body: &ErrorResponseBody) -> ReplicationError {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    let (mut detail, mut hint) = (None, None);
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'S' => severity = v,
            b'C' => code = v,
            b'M' => message = v,
            b'D' => detail = Some(v),
            b'H' => hint = Some(v),
            _ => {}
        }
    }
    ReplicationError::Server {
        severity,
        code,
        message,
        detail,
        hint,
    }
}

/// Output settings the replication session pins for the decoder (appended to the user's options).
pub const REPLICATION_SESSION_OPTIONS: &str =
    "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=postgres";

/// The user's `options` followed by `ours` (a later `-c` wins over an earlier one).
pub fn append_options(user: Option<&str>, ours: &str) -> String {
    match user.map(str::trim).filter(|u| !u.is_empty()) {
        Some(user) => format!("{user} {ours}"),
        None => ours.to_string(),
    }
}

/// Logs a notice the server sent (what `client_min_messages` lets through; WARNINGs by default).
pub(super) fn log_notice(body: &NoticeResponseBody) {
    let (mut severity, mut message) = (String::new(), String::new());
    let mut detail = None;
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'V' => severity = v,
            b'S' if severity.is_empty() => severity = v,
            b'M' => message = v,
            b'D' => detail = Some(v),
            _ => {}
        }
    }
    let detail = detail.unwrap_or_default();
    if severity == "WARNING" {
        tracing::warn!(%severity, %detail, "PostgreSQL replication connection: {message}");
    } else {
        tracing::info!(%severity, %detail, "PostgreSQL replication connection: {message}");
    }
}

/// One server of the URL's host list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// The name TLS verifies and messages show (a directory for a Unix socket).
    pub host: String,
    /// Where to connect: the URL's `hostaddr` when it gives one, else `host`.
    pub addr: String,
    pub port: u16,
}

impl Server {
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Where and how to connect, taken from the same URL the ordinary SQL connection uses.
#[derive(Clone)]
pub struct ConnectParams {
    pub tls: super::tls::PgTls,
    /// The servers to try, in order (libpq's multi-host URL: `postgres://u@h1:5432,h2:5432/db`).
    pub servers: Vec<Server>,
    /// `target_session_attrs`: which kind of server is acceptable (as for the SQL sessions).
    pub target: TargetSessionAttrs,
    /// `load_balance_hosts=random`: try the servers in a random order.
    pub random_order: bool,
    pub user: String,
    pub password: Option<Vec<u8>>,
    pub dbname: String,
    /// The `options` of the URL (command-line switches for the server session, e.g.
    /// `-c search_path=app`); the replication session's own settings are appended to them.
    pub options: Option<String>,
    /// TCP keepalive (idle time before the first probe, interval, probes), `None` when off.
    pub keepalive: Option<(Duration, Option<Duration>, Option<u32>)>,
    /// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the kernel gives up.
    pub tcp_user_timeout: Option<Duration>,
}

impl std::fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        write!(f, "{}@{}/{}", self.user, self.endpoint(), self.dbname)
    }
}

impl ConnectParams {
    pub fn from_config(
        cfg: &tokio_postgres::Config,
        tls: super::tls::PgTls,
    ) -> Result<Self, ReplicationError> {
        let servers = servers(cfg)?;
        let user = cfg
            .get_user()
            .ok_or_else(|| ReplicationError::Config("the PostgreSQL URL names no user".into()))?
            .to_string();
        Ok(ConnectParams {
            tls,
            servers,
            target: cfg.get_target_session_attrs(),
            random_order: cfg.get_load_balance_hosts() == LoadBalanceHosts::Random,
            dbname: cfg.get_dbname().unwrap_or(&user).to_string(),
            user,
            password: cfg.get_password().map(<[u8]>::to_vec),
            options: cfg.get_options().map(str::to_string),
            keepalive: cfg.get_keepalives().then(|| {
                (
                    cfg.get_keepalives_idle(),
                    cfg.get_keepalives_interval(),
                    cfg.get_keepalives_retries(),
                )
            }),
            tcp_user_timeout: cfg.get_tcp_user_timeout().copied(),
        })
    }

    /// Every server, `host:port` joined by commas.
    pub fn endpoint(&self) -> String {
        self.servers
            .iter()
            .map(Server::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// These settings for one server only, and any kind of session: to reach again the server a
    /// connection went to.
    fn pinned(&self, server: &Server) -> ConnectParams {
        ConnectParams {
            servers: vec![server.clone()],
            target: TargetSessionAttrs::Any,
            random_order: false,
            ..self.clone()
        }
    }

    /// The servers in the order to try them.
    fn attempt_order(&self) -> Vec<&Server> {
        let mut order: Vec<&Server> = self.servers.iter().collect();
        if self.random_order && order.len() > 1 {
            // Any spread will do (libpq shuffles); the clock's nanoseconds pick where to begin.
            let start = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as usize)
                .unwrap_or(0)
                % order.len();
            order.rotate_left(start);
        }
        order
    }
}

/// The URL's servers as libpq pairs them: `host` and `hostaddr` one to one, and either one `port`
/// for all or one per server.
fn servers(cfg: &tokio_postgres::Config) -> Result<Vec<Server>, ReplicationError> {
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let addrs: Vec<String> = cfg.get_hostaddrs().iter().map(|a| a.to_string()).collect();
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        return Err(ReplicationError::Config(format!(
            "the URL names {} hosts but {} hostaddrs",
            hosts.len(),
            addrs.len()
        )));
    }
    let n = hosts.len().max(addrs.len()).max(1);
    let ports = cfg.get_ports();
    if ports.len() > 1 && ports.len() != n {
        return Err(ReplicationError::Config(format!(
            "the URL names {n} hosts but {} ports (give one port for all, or one per host)",
            ports.len()
        )));
    }
    Ok((0..n)
        .map(|i| {
            let addr = addrs.get(i).or(hosts.get(i)).cloned();
            let addr = addr.unwrap_or_else(|| "localhost".to_string());
            Server {
                host: hosts.get(i).cloned().unwrap_or_else(|| addr.clone()),
                addr,
                port: ports.get(i).or(ports.first()).copied().unwrap_or(5432),
            }
        })
        .collect())
}

/// A walsender connection in `replication=database` mode, before streaming starts.
pub struct ReplicationClient {
    socket: Box<dyn Socket>,
    read_buf: BytesMut,
    /// Bytes not yet written; `flush` takes them out only as the socket accepts them.
    pub(super) write_buf: BytesMut,
    endpoint: String,
    /// How this connection was made, to open another one to the same server.
    params: Option<ConnectParams>,
    /// The walsender's process id (BackendKeyData).
    pub(super) backend_pid: Option<i32>,
    /// `server_version` as the server reported it at startup.
    server_version: Option<String>,
}

/// Longest one server may take from TCP connect to a ready replication session.
const CONNECT_DEADLINE: Duration = Duration::from_secs(20);

/// Longest a write to the server may take: a server that reads nothing for this long is gone.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// TCP keepalive and TCP_USER_TIMEOUT, so that a dead peer also fails the socket itself.
fn tune_tcp(tcp: &TcpStream, params: &ConnectParams) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(tcp);
    if let Some((idle, interval, retries)) = params.keepalive {
        let mut ka = socket2::TcpKeepalive::new().with_time(idle);
        if let Some(i) = interval {
            ka = ka.with_interval(i);
        }
        if let Some(r) = retries {
            ka = ka.with_retries(r);
        }
        sock.set_tcp_keepalive(&ka)?;
    }
    #[cfg(target_os = "linux")]
    if let Some(t) = params.tcp_user_timeout {
        sock.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}

/// Which server and which history a connection reached (`IDENTIFY_SYSTEM`): a promoted standby
/// has the same system identifier as its old primary but a new timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
}

/// What `CREATE_REPLICATION_SLOT` returns.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    pub consistent_point: Lsn,
    pub snapshot_name: Option<String>,
}

impl ReplicationClient {
    /// Connects to the first server of the URL that answers and is the kind of server
    /// `target_session_attrs` asks for, as libpq does.
    pub async fn connect(params: &ConnectParams) -> Result<Self, ReplicationError> {
        let mut errors = Vec::new();
        for server in params.attempt_order() {
            // The whole handshake is bounded, not just TCP: a server that accepts connections and
            // then answers nothing (stuck on I/O, often why a failover happens) must not keep
            // the next one from being tried.
            let attempt = tokio::time::timeout(CONNECT_DEADLINE, Self::connect_to(params, server));
            let result = attempt.await.unwrap_or_else(|_| {
                Err(ReplicationError::Io {
                    endpoint: server.endpoint(),
                    source: std::io::ErrorKind::TimedOut.into(),
                })
            });
            match result {
                Ok(client) => {
                    if params.servers.len() > 1 {
                        tracing::debug!(server = %server.endpoint(), skipped = errors.len(), "replication connection: server chosen");
                    }
                    return Ok(client);
                }
                Err(e) => {
                    if params.servers.len() > 1 {
                        tracing::debug!(server = %server.endpoint(), error = %e, "replication connection: trying the next server");
                    }
                    errors.push((server.endpoint(), e));
                }
            }
        }
        // One server: its own error, as before multi-host URLs.
        if errors.len() == 1 {
            if let Some((_, e)) = errors.pop() {
                return Err(e);
            }
        }
        Err(ReplicationError::NoServer(errors))
    }

    async fn connect_to(params: &ConnectParams, server: &Server) -> Result<Self, ReplicationError> {
        let endpoint = server.endpoint();
        let io = |source| ReplicationError::Io {
            endpoint: endpoint.clone(),
            source,
        };
        let socket: Box<dyn Socket> = if server.addr.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", server.addr, server.port);
            Box::new(tokio::net::UnixStream::connect(path).await.map_err(io)?)
        } else {
            let tcp = tokio::time::timeout(
                Duration::from_secs(10),
                TcpStream::connect((server.addr.as_str(), server.port)),
            )
            .await
            .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
            .map_err(io)?;
            tcp.set_nodelay(true).map_err(io)?;
            tune_tcp(&tcp, params).map_err(io)?;
            negotiate_tls(tcp, params, server).await?
        };
        let pinned = params.pinned(server);
        let mut client = ReplicationClient {
            socket,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::with_capacity(1024),
            endpoint,
            params: Some(pinned.clone()),
            backend_pid: None,
            server_version: None,
        };
        client.startup(&pinned).await?;
        client.check_session_kind(params.target).await?;
        Ok(client)
    }

    /// `target_session_attrs`, checked as tokio-postgres checks it for the SQL sessions (a
    /// walsender in `replication=database` mode answers SHOW): a standby is read-only.
    async fn check_session_kind(
        &mut self,
        target: TargetSessionAttrs,
    ) -> Result<(), ReplicationError> {
        let want_read_only = match target {
            TargetSessionAttrs::ReadWrite => false,
            TargetSessionAttrs::ReadOnly => true,
            _ => return Ok(()),
        };
        let rows = self.simple_query("SHOW transaction_read_only").await?;
        let read_only = rows.first().and_then(|r| r.first().cloned().flatten());
        let read_only = match read_only.as_deref() {
            Some("on") => true,
            Some("off") => false,
            other => {
                return Err(ReplicationError::Protocol(format!(
                    "SHOW transaction_read_only answered {other:?}"
                )))
            }
        };
        if read_only == want_read_only {
            return Ok(());
        }
        let reason = if read_only {
            "the server accepts no writes (a standby?) and target_session_attrs=read-write asks for a primary"
        } else {
            "the server accepts writes and target_session_attrs=read-only asks for a standby"
        };
        Err(ReplicationError::WrongSessionKind {
            endpoint: self.endpoint.clone(),
            reason: reason.into(),
        })
    }

    /// The server's major version, from what it reported at startup.
    pub fn server_major(&self) -> Option<u32> {
        let v = self.server_version.as_deref()?;
        let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// Whether the server has failover slots (PostgreSQL 17+): slots a standby with
    /// `sync_replication_slots` keeps a copy of, usable once it is promoted.
    pub fn supports_failover_slots(&self) -> bool {
        self.server_major().is_some_and(|m| m >= 17)
    }

    /// `IDENTIFY_SYSTEM`: the server's system identifier and current timeline.
    /// `IDENTIFY_SYSTEM`: which server and timeline this is, and how far its WAL is flushed.
    pub async fn identify_system(&mut self) -> Result<(SystemIdentity, Lsn), ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten();
        let system_id = field(0).ok_or_else(|| {
            ReplicationError::Protocol("IDENTIFY_SYSTEM without a system identifier".into())
        })?;
        let timeline = field(1).and_then(|t| t.parse().ok()).ok_or_else(|| {
            ReplicationError::Protocol("IDENTIFY_SYSTEM without a timeline".into())
        })?;
        let flushed = field(2)
            .and_then(|l| l.parse::<Lsn>().ok())
            .ok_or_else(|| {
                ReplicationError::Protocol("IDENTIFY_SYSTEM without a WAL position".into())
            })?;
        Ok((
            SystemIdentity {
                system_id,
                timeline,
            },
            flushed,
        ))
    }

    /// The slot's confirmed position on this server (`None`: no such slot, or none yet).
    pub async fn slot_confirmed(&mut self, slot: &str) -> Result<Option<Lsn>, ReplicationError> {
        let rows = self
            .simple_query(&format!(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = {}",
                quote_literal(slot)
            ))
            .await?;
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .map(|v| {
                v.parse::<Lsn>()
                    .map_err(|e| ReplicationError::Protocol(e.to_string()))
            })
            .transpose()
    }

    /// `ALTER_REPLICATION_SLOT … (FAILOVER true)` (PostgreSQL 17+), for a slot created without
    /// it. The server refuses while another session streams the slot.
    pub async fn enable_failover(&mut self, slot: &str) -> Result<(), ReplicationError> {
        self.simple_query(&format!(
            "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
            quote_ident(slot)
        ))
        .await?;
        Ok(())
    }

    pub fn endpoint_name(&self) -> &str {
        &self.endpoint
    }

    /// A client over an already started connection (tests play the server on the other end).
    #[cfg(test)]
    pub(super) fn over(socket: impl AsyncRead + AsyncWrite + Unpin + Send + 'static) -> Self {
        ReplicationClient {
            socket: Box::new(socket),
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            endpoint: "test".into(),
            params: None,
            backend_pid: None,
            server_version: None,
        }
    }

    /// Ends the walsender `pid` if it still holds `slot`, over a new connection (a walsender in
    /// `replication=database` mode runs SQL, and a role may end its own sessions). For a
    /// connection taken for dead: its walsender keeps the slot until `wal_sender_timeout`, and
    /// the reconnect would be refused until then. Returns whether one was ended.
    pub(super) async fn terminate_walsender(
        &self,
        pid: i32,
        slot: &str,
    ) -> Result<bool, ReplicationError> {
        let Some(params) = &self.params else {
            return Ok(false);
        };
        let mut other = ReplicationClient::connect(params).await?;
        let rows = other
            .simple_query(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = {} AND active_pid = {pid}",
                quote_literal(slot)
            ))
            .await?;
        Ok(rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .is_some_and(|v| v == "t"))
    }

    async fn startup(&mut self, params: &ConnectParams) -> Result<(), ReplicationError> {
        // Output functions run in the walsender with this session's settings: pin them (after
        // the user's own options, so ours win) so the text the decoder parses (timestamps above
        // all) has one known format.
        let options = append_options(params.options.as_deref(), REPLICATION_SESSION_OPTIONS);
        frontend::startup_message(
            [
                ("user", params.user.as_str()),
                ("database", params.dbname.as_str()),
                ("replication", "database"),
                ("application_name", "cdc-relay"),
                ("client_encoding", "UTF8"),
                ("options", options.as_str()),
            ],
            &mut self.write_buf,
        )
        .map_err(|e| ReplicationError::Protocol(e.to_string()))?;
        self.flush().await?;

        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.recv().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let pw = self.password(params)?;
                    frontend::password_message(&pw, &mut self.write_buf).map_err(proto)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = self.password(params)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        params.user.as_bytes(),
                        &pw,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)
                        .map_err(proto)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut supported = false;
                    while let Some(m) = mechanisms.next().map_err(proto)? {
                        supported |= m == SCRAM_SHA_256;
                    }
                    if !supported {
                        return Err(ReplicationError::Auth(
                            "server offers no SASL mechanism this client supports (SCRAM-SHA-256)"
                                .into(),
                        ));
                    }
                    let pw = self.password(params)?;
                    let s = ScramSha256::new(&pw, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        SCRAM_SHA_256,
                        s.message(),
                        &mut self.write_buf,
                    )
                    .map_err(proto)?;
                    self.flush().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Auth("SASL continue before SASL start".into())
                    })?;
                    s.update(body.data())
                        .map_err(|e| ReplicationError::Auth(e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut self.write_buf).map_err(proto)?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Auth("SASL final before SASL start".into())
                    })?;
                    s.finish(body.data())
                        .map_err(|e| ReplicationError::Auth(format!("server signature: {e}")))?;
                }
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                Message::NoticeResponse(body) => log_notice(&body),
                Message::BackendKeyData(body) => self.backend_pid = Some(body.process_id()),
                Message::ParameterStatus(body) => {
                    if body.name().map_err(proto)? == "server_version" {
                        self.server_version = Some(body.value().map_err(proto)?.to_string());
                    }
                }
                _ => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message during startup".into(),
                    ))
                }
            }
        }
    }

    fn password(&self, params: &ConnectParams) -> Result<Vec<u8>, ReplicationError> {
        params.password.clone().ok_or_else(|| {
            ReplicationError::Auth(
                "the server asks for a password and the PostgreSQL URL has none".into(),
            )
        })
    }

    /// Runs a replication command or query and returns its rows as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        frontend::query(sql, &mut self.write_buf).map_err(proto)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.recv().await? {
                Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(r) = ranges.next().map_err(proto)? {
                        row.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::NoticeResponse(body) => log_notice(&body),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// `CREATE_REPLICATION_SLOT … LOGICAL pgoutput`, exporting a snapshot when asked, and with
    /// `FAILOVER` when asked (PostgreSQL 17+). The snapshot stays importable only until this
    /// connection runs its next command.
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        export_snapshot: bool,
        failover: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        let rows = self
            .simple_query(&create_slot_command(slot, export_snapshot, failover))
            .await?;
        let row = rows.first().ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let consistent_point = row
            .get(1)
            .and_then(|v| v.as_deref())
            .ok_or_else(|| ReplicationError::Protocol("slot without consistent point".into()))?
            .parse::<Lsn>()
            .map_err(|e| ReplicationError::Protocol(e.to_string()))?;
        Ok(CreatedSlot {
            consistent_point,
            snapshot_name: row.get(2).cloned().flatten(),
        })
    }

    /// `START_REPLICATION`: from here on the connection carries CopyData both ways.
    /// `Lsn::ZERO` resumes from the slot's confirmed position.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
        origin_none: bool,
    ) -> Result<ReplicationStream, ReplicationError> {
        // `origin 'none'` (PostgreSQL 16+): transactions written under a replication origin (the
        // ledger's, see origin.rs) are skipped by the server before decoding.
        let origin = if origin_none { ", origin 'none'" } else { "" };
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '1', publication_names {}, messages 'true'{origin})",
            quote_ident(slot),
            quote_literal(&quote_ident(publication)),
        );
        frontend::query(&sql, &mut self.write_buf).map_err(proto)?;
        self.flush().await?;
        loop {
            match self.recv_frame().await? {
                Frame::CopyBoth => break,
                Frame::Other(Message::ErrorResponse(body)) => {
                    let err = server_error(&body);
                    return Err(err);
                }
                Frame::Other(Message::NoticeResponse(body)) => log_notice(&body),
                _ => {
                    return Err(ReplicationError::Protocol(
                        "expected CopyBothResponse after START_REPLICATION".into(),
                    ))
                }
            }
        }
        Ok(ReplicationStream::new(self, slot, start))
    }

    /// Writes `write_buf` out. Cancel-safe: bytes leave the buffer only once the socket took them,
    /// so a cancelled flush loses nothing and the next one sends the rest first. A server that
    /// takes nothing for [`WRITE_TIMEOUT`] is an I/O error (a dead peer with a full send buffer).
    pub(super) async fn flush(&mut self) -> Result<(), ReplicationError> {
        let write = async {
            while !self.write_buf.is_empty() {
                let n = self.socket.write(&self.write_buf).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                self.write_buf.advance(n);
            }
            self.socket.flush().await
        };
        let result = match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the server took nothing written for {}s",
                    WRITE_TIMEOUT.as_secs()
                ),
            )),
        };
        result.map_err(|source| ReplicationError::Io {
            endpoint: self.endpoint.clone(),
            source,
        })
    }

    async fn recv(&mut self) -> Result<Message, ReplicationError> {
        match self.recv_frame().await? {
            Frame::Other(m) => Ok(m),
            Frame::CopyBoth => Err(ReplicationError::Protocol(
                "unexpected CopyBothResponse".into(),
            )),
        }
    }

    /// Reads one backend message. Cancel-safe: bytes stay in `read_buf` until a whole frame is there.
    pub(super) async fn recv_frame(&mut self) -> Result<Frame, ReplicationError> {
        loop {
            if let Some(frame) = self.try_parse_frame()? {
                return Ok(frame);
            }
            let n = self
                .socket
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|source| ReplicationError::Io {
                    endpoint: self.endpoint.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(ReplicationError::Io {
                    endpoint: self.endpoint.clone(),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
        }
    }

    fn try_parse_frame(&mut self) -> Result<Option<Frame>, ReplicationError> {
        if self.read_buf.len() < 5 {
            return Ok(None);
        }
        let tag = self.read_buf[0];
        let len = u32::from_be_bytes([
            self.read_buf[1],
            self.read_buf[2],
            self.read_buf[3],
            self.read_buf[4],
        ]) as usize;
        if !(4..=MAX_MESSAGE_LEN).contains(&len) {
            return Err(ReplicationError::Protocol(format!(
                "backend message {:?} with invalid length {len}",
                tag as char
            )));
        }
        if self.read_buf.len() < len + 1 {
            // Grow towards the frame, but only as far as the bytes actually arriving need.
            self.read_buf
                .reserve((len + 1 - self.read_buf.len()).min(1 << 20));
            return Ok(None);
        }
        let mut frame = self.read_buf.split_to(len + 1);
        // postgres-protocol does not know CopyBothResponse ('W'), which only replication uses.
        if tag == b'W' {
            return Ok(Some(Frame::CopyBoth));
        }
        match Message::parse(&mut frame).map_err(proto)? {
            Some(m) => Ok(Some(Frame::Other(m))),
            None => Err(ReplicationError::Protocol(
                "incomplete backend message".into(),
            )),
        }
    }
}

pub(super) enum Frame {
    CopyBoth,
    Other(Message),
}

pub(super) fn proto(e: std::io::Error) -> ReplicationError {
    ReplicationError::Protocol(e.to_string())
}

/// The slot's creation command. The option list exists from PostgreSQL 15 on and is the only way to
/// ask for FAILOVER; without it the old keyword form keeps 14 working.
fn create_slot_command(slot: &str, export_snapshot: bool, failover: bool) -> String {
    let slot = quote_ident(slot);
    if failover {
        let snapshot = if export_snapshot { "export" } else { "nothing" };
        format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT '{snapshot}', FAILOVER true)")
    } else {
        let snapshot = if export_snapshot {
            "EXPORT_SNAPSHOT"
        } else {
            "NOEXPORT_SNAPSHOT"
        };
        format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput {snapshot}")
    }
}

/// Quotes an SQL identifier: embedded double quotes are doubled, so no name can break out.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(url: &str) -> ConnectParams {
        let cfg: tokio_postgres::Config = url.parse().unwrap();
        ConnectParams::from_config(
            &cfg,
            super::super::tls::PgTls::new(super::super::tls::SslMode::Disable, None).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn a_multi_host_url_lists_every_server_in_order() {
        let p = params("postgres://u:p@h1:5001,h2:5002/db?target_session_attrs=read-write");
        assert_eq!(p.endpoint(), "h1:5001,h2:5002");
        assert_eq!(p.target, TargetSessionAttrs::ReadWrite);
        let order: Vec<String> = p.attempt_order().iter().map(|s| s.endpoint()).collect();
        assert_eq!(order, ["h1:5001", "h2:5002"]);
        // One port for all servers, and hostaddr pairs with host (TLS still checks the name).
        let p = params("host=a,b hostaddr=127.0.0.1,127.0.0.2 port=7000 user=u");
        assert_eq!(p.servers[1].host, "b");
        assert_eq!(p.servers[1].addr, "127.0.0.2");
        assert_eq!(p.servers[1].port, 7000);
        assert_eq!(params("postgres://u@h/db").target, TargetSessionAttrs::Any);
        // A connection remembers the one server it reached, for any session kind.
        let p = params("postgres://u@h1,h2/db?target_session_attrs=read-write");
        let pinned = p.pinned(&p.servers[1]);
        assert_eq!(pinned.endpoint(), "h2:5432");
        assert_eq!(pinned.target, TargetSessionAttrs::Any);
        let cfg: tokio_postgres::Config = "host=a,b,c port=1,2 user=u".parse().unwrap();
        assert!(servers(&cfg).is_err());
    }

    #[test]
    fn the_slot_asks_for_failover_only_when_told() {
        assert_eq!(
            create_slot_command("s", false, true),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER true)"
        );
        assert_eq!(
            create_slot_command("s", false, false),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput NOEXPORT_SNAPSHOT"
        );
    }

    #[test]
    fn a_failed_server_among_several_is_worth_a_retry_if_any_may_come_back() {
        let down = ReplicationError::Io {
            endpoint: "h1:1".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        let standby = ReplicationError::WrongSessionKind {
            endpoint: "h2:2".into(),
            reason: "standby".into(),
        };
        let e = ReplicationError::NoServer(vec![("h1:1".into(), down), ("h2:2".into(), standby)]);
        assert!(e.is_transient());
        assert!(e.to_string().contains("h1:1: ") && e.to_string().contains("; h2:2: "));
        let e = ReplicationError::NoServer(vec![(
            "h:1".into(),
            ReplicationError::Auth("wrong password".into()),
        )]);
        assert!(!e.is_transient());
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
