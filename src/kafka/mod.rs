//! Kafka: the producer `stream` ships events with, the consumer `sink` reads them with, and topic
//! handling. Speaks [`crate::event::ChangeEvent`] and bytes; knows neither PostgreSQL nor ClickHouse.

pub mod checkpoint;
pub mod consumer;
pub mod inspect;
pub mod producer;
pub mod schemas;
pub mod topic;

pub use rdkafka::error::KafkaError as RdKafkaError;

use rdkafka::config::ClientConfig;

/// How to reach the brokers: addresses and, when the cluster asks for it, TLS and SASL. Every
/// client of ours (producer, consumer, admin, inspection) is built from one of these, so a secured
/// cluster needs the settings once. Never printed with the password.
#[derive(Clone, Default)]
pub struct KafkaConnection {
    pub brokers: String,
    /// librdkafka's `security.protocol`: plaintext, ssl, sasl_plaintext or sasl_ssl.
    pub security_protocol: Option<String>,
    /// `sasl.mechanism`: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
    /// CA certificate(s), PEM, that the brokers' certificates are verified against.
    pub ssl_ca_file: Option<std::path::PathBuf>,
    /// Client certificate and key, PEM, for brokers that authenticate clients by certificate.
    pub ssl_certificate_file: Option<std::path::PathBuf>,
    pub ssl_key_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for KafkaConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConnection")
            .field("brokers", &self.brokers)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("ssl_ca_file", &self.ssl_ca_file)
            .finish_non_exhaustive()
    }
}

impl KafkaConnection {
    pub fn plaintext(brokers: &str) -> Self {
        KafkaConnection {
            brokers: brokers.to_string(),
            ..Default::default()
        }
    }

    /// Refuses combinations librdkafka would only reject later, with a vaguer message.
    pub fn validate(&self) -> Result<(), String> {
        let protocol = self
            .security_protocol
            .as_deref()
            .unwrap_or("plaintext")
            .to_ascii_lowercase();
        let sasl = match protocol.as_str() {
            "plaintext" | "ssl" => false,
            "sasl_plaintext" | "sasl_ssl" => true,
            other => {
                return Err(format!(
                    "--kafka-security-protocol {other:?}: expected plaintext, ssl, sasl_plaintext or sasl_ssl"
                ))
            }
        };
        if let Some(m) = &self.sasl_mechanism {
            if !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
                .contains(&m.to_ascii_uppercase().as_str())
            {
                return Err(format!(
                    "--kafka-sasl-mechanism {m:?}: expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
                ));
            }
        }
        if sasl && (self.sasl_username.is_none() || self.sasl_password.is_none()) {
            return Err(format!(
                "--kafka-security-protocol {protocol} needs --kafka-sasl-username and a password (--kafka-sasl-password-file or CDC_RELAY_KAFKA_SASL_PASSWORD)"
            ));
        }
        if !sasl && (self.sasl_username.is_some() || self.sasl_mechanism.is_some()) {
            return Err(format!(
                "SASL settings are given but --kafka-security-protocol is {protocol}: use sasl_ssl (or sasl_plaintext)"
            ));
        }
        if self.ssl_certificate_file.is_some() != self.ssl_key_file.is_some() {
            return Err("--kafka-ssl-certificate-file and --kafka-ssl-key-file go together".into());
        }
        for file in [
            &self.ssl_ca_file,
            &self.ssl_certificate_file,
            &self.ssl_key_file,
        ]
        .into_iter()
        .flatten()
        {
            std::fs::metadata(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        }
        Ok(())
    }

    /// A client configuration with the brokers, the security settings and what every client of
    /// ours shares.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", "cdc-relay")
            .set("log_level", "4");
        let settings = [
            ("security.protocol", self.security_protocol.clone()),
            ("sasl.mechanism", self.sasl_mechanism.clone()),
            ("sasl.username", self.sasl_username.clone()),
            ("sasl.password", self.sasl_password.clone()),
            ("ssl.ca.location", path_string(&self.ssl_ca_file)),
            (
                "ssl.certificate.location",
                path_string(&self.ssl_certificate_file),
            ),
            ("ssl.key.location", path_string(&self.ssl_key_file)),
        ];
        for (key, value) in settings {
            if let Some(v) = value {
                c.set(key, v);
            }
        }
        c
    }
}

fn path_string(p: &Option<std::path::PathBuf>) -> Option<String> {
    p.as_ref().map(|p| p.display().to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("Kafka ({context}): {source}. Check --kafka-brokers / CDC_RELAY_KAFKA_BROKERS, that the brokers are reachable, and the --kafka-security-protocol / --kafka-sasl-* / --kafka-ssl-* settings if the cluster is secured")]
    Client {
        context: String,
        #[source]
        source: RdKafkaError,
    },
    #[error("Kafka at {brokers} refused the connection: {reason}. Check the --kafka-security-protocol / --kafka-sasl-* / --kafka-ssl-* settings against the broker's listener")]
    Refused { brokers: String, reason: String },
    #[error("Kafka topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    /// A topic could not be created for a reason that passes (fewer live brokers than a moment
    /// ago, during a broker's restart).
    #[error("Kafka topic {topic}: {reason}; retrying")]
    TopicNotYet { topic: String, reason: String },
    #[error("Kafka did not acknowledge a message: {0}")]
    Delivery(String),
    /// The producer cannot go on (fenced by a newer producer with its transactional id).
    #[error("Kafka producer stopped for good: {0}")]
    Fatal(String),
    #[error("a message of {size} bytes is over topic {topic}'s limit of {limit} bytes (max.message.bytes)")]
    TooLarge {
        topic: String,
        size: usize,
        limit: usize,
    },
}

impl KafkaError {
    /// Brokers down or slow to answer (a restart, a leader election): worth waiting for. A refused
    /// login, a bad topic or a fenced producer is not.
    pub fn is_transient(&self) -> bool {
        match self {
            KafkaError::Client { source, .. } => is_transient(source),
            KafkaError::Delivery(_) | KafkaError::TopicNotYet { .. } => true,
            _ => false,
        }
    }

    pub fn client(context: impl Into<String>) -> impl FnOnce(RdKafkaError) -> KafkaError {
        let context = context.into();
        move |source| KafkaError::Client { context, source }
    }
}

/// Whether librdkafka's error is about reaching the brokers, which passes.
pub fn is_transient(e: &RdKafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::OperationTimedOut
                | C::RequestTimedOut
                | C::NetworkException
                | C::NotLeaderForPartition
                | C::LeaderNotAvailable
                | C::BrokerNotAvailable
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
                | C::CoordinatorLoadInProgress
                | C::Resolve
        )
    )
}
