# cdc-relay image for docker-compose.yml. librdkafka is built from the crate's bundled sources and links
# OpenSSL (Kafka TLS/SASL): libssl-dev in the build image, libssl3 at run time.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin cdc-relay

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/cdc-relay /usr/local/bin/cdc-relay
USER nobody
ENTRYPOINT ["/usr/local/bin/cdc-relay"]
