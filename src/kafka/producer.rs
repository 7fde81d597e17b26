//! The idempotent producer `stream` uses. Every change is keyed by row id, so one row's changes stay
//! in one partition in order; idempotence keeps librdkafka's retries from reordering or doubling them.

use std::future::Future;
use std::time::Duration;

use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::event::ChangeEvent;

use super::{KafkaConnection, KafkaError, RdKafkaError};

pub struct KafkaProducer {
    producer: FutureProducer,
    topic: String,
}

/// Settings of the stream's producer.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub connection: KafkaConnection,
    pub topic: String,
    /// librdkafka's local queue; kept near the relay's own in-flight bound so memory stays bounded.
    pub queue_messages: usize,
}

/// What became of one message.
pub type DeliveryResult = Result<(), KafkaError>;

impl KafkaProducer {
    pub fn new(cfg: &ProducerConfig) -> Result<Self, KafkaError> {
        let producer: FutureProducer = cfg
            .connection
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            // Deliveries are retried inside librdkafka for this long (a broker restart fits);
            // past it the message fails and the stream restarts from its last confirmed position.
            .set("message.timeout.ms", "120000")
            .set(
                "queue.buffering.max.messages",
                cfg.queue_messages.max(1000).to_string(),
            )
            .set("queue.buffering.max.kbytes", "65536")
            .create()
            .map_err(KafkaError::client("creating the producer"))?;
        Ok(KafkaProducer {
            producer,
            topic: cfg.topic.clone(),
        })
    }

    /// Enqueues one event and returns the future of its acknowledgement and the payload size.
    /// Waits (without blocking the runtime) while librdkafka's local queue is full.
    pub async fn send(
        &self,
        event: &ChangeEvent,
    ) -> Result<(impl Future<Output = DeliveryResult> + Send + 'static, usize), KafkaError> {
        let payload = event.to_json();
        let key = event.key();
        loop {
            let mut record = FutureRecord::to(&self.topic).payload(&payload);
            if let Some(k) = &key {
                record = record.key(k);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    let ack = async move {
                        match delivery.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err((e, _))) => Err(KafkaError::Delivery(e.to_string())),
                            Err(_) => Err(KafkaError::Delivery("producer dropped".into())),
                        }
                    };
                    return Ok((ack, payload.len()));
                }
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(KafkaError::Client {
                        context: format!("producing to {}", self.topic),
                        source: e,
                    })
                }
            }
        }
    }
}
