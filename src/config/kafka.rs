//! The Kafka brokers, the topic and the security towards the brokers.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "CDC_RELAY_KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// Topic that carries the change events of the one table relayed (default: `user_events` for
    /// `public.user_logins`, the seed's contract, and `<schema>.<table>` for any other table).
    #[arg(long, env = "CDC_RELAY_TOPIC")]
    pub topic: Option<String>,

    /// The topic of one table, `schema.table=topic` (repeatable, or comma-separated), when
    /// several tables are relayed.
    #[arg(long = "route", env = "CDC_RELAY_ROUTE", value_delimiter = ',')]
    pub routes: Vec<String>,

    #[command(flatten)]
    pub security: KafkaSecurityArgs,
}

/// The sink's brokers and topics: like [`KafkaArgs`], but `--topic` may be given several times
/// (or `CDC_RELAY_TOPIC=a,b`), all consumed in one group.
#[derive(Debug, Clone, Args)]
pub struct SinkKafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "CDC_RELAY_KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// Topic that carries the change events; repeat it (or separate with commas) to consume
    /// several. Each topic's schemas are read from `<topic>.schemas`.
    #[arg(
        long = "topic",
        env = "CDC_RELAY_TOPIC",
        default_value = "user_events",
        value_delimiter = ','
    )]
    pub topics: Vec<String>,

    #[command(flatten)]
    pub security: KafkaSecurityArgs,
}

/// TLS and SASL towards the brokers (librdkafka's `security.protocol`, `sasl.*`, `ssl.*`).
#[derive(Debug, Clone, Default, Args)]
pub struct KafkaSecurityArgs {
    /// plaintext (default), ssl, sasl_plaintext or sasl_ssl.
    #[arg(long, env = "CDC_RELAY_KAFKA_SECURITY_PROTOCOL")]
    pub kafka_security_protocol: Option<String>,

    /// SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long, env = "CDC_RELAY_KAFKA_SASL_MECHANISM")]
    pub kafka_sasl_mechanism: Option<String>,

    /// SASL user name.
    #[arg(long, env = "CDC_RELAY_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,

    /// SASL password (prefer the file or the environment: a flag shows in the process list).
    #[arg(long, env = "CDC_RELAY_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<String>,

    /// File holding the SASL password (overrides --kafka-sasl-password).
    #[arg(long, env = "CDC_RELAY_KAFKA_SASL_PASSWORD_FILE")]
    pub kafka_sasl_password_file: Option<std::path::PathBuf>,

    /// CA certificate(s), PEM, that the brokers' certificates are verified against (ssl, sasl_ssl).
    #[arg(long, env = "CDC_RELAY_KAFKA_SSL_CA_FILE")]
    pub kafka_ssl_ca_file: Option<std::path::PathBuf>,

    /// Client certificate, PEM, for brokers that require client authentication.
    #[arg(long, env = "CDC_RELAY_KAFKA_SSL_CERTIFICATE_FILE")]
    pub kafka_ssl_certificate_file: Option<std::path::PathBuf>,

    /// Private key, PEM, of the client certificate.
    #[arg(long, env = "CDC_RELAY_KAFKA_SSL_KEY_FILE")]
    pub kafka_ssl_key_file: Option<std::path::PathBuf>,
}
