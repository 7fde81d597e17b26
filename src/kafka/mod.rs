//! Kafka: the producer `stream` ships events with, the consumer `sink` reads them with, and topic
//! handling. Speaks [`crate::event::ChangeEvent`] and bytes; knows neither PostgreSQL nor ClickHouse.

pub mod consumer;
pub mod inspect;
pub mod producer;
pub mod topic;

pub use rdkafka::error::KafkaError as RdKafkaError;

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("Kafka ({context}): {source}. Check --kafka-brokers / CDC_RELAY_KAFKA_BROKERS and that the brokers are reachable")]
    Client {
        context: String,
        #[source]
        source: RdKafkaError,
    },
    #[error("Kafka topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    #[error("Kafka did not acknowledge a message: {0}")]
    Delivery(String),
}

impl KafkaError {
    pub fn client(context: impl Into<String>) -> impl FnOnce(RdKafkaError) -> KafkaError {
        let context = context.into();
        move |source| KafkaError::Client { context, source }
    }
}
