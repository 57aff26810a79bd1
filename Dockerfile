# One image for the whole platform: the gateway and the four services, each started by its
# own binary name (see docker-compose.yml), plus the `sluice` dead-letter CLI for operators
# (`docker compose exec inventory sluice dlq list inventory.reserve-stock.dlq`).
# No protoc and no C crypto toolchain are needed.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
    && mkdir -p /out \
    && cp target/release/sluice-gateway target/release/sluice-inventory target/release/sluice-payment \
          target/release/sluice-notification target/release/sluice-orders target/release/sluice /out/

FROM debian:bookworm-slim
# The system's root certificates, which amqps:// trusts (besides SLUICE_AMQP_CA_FILE).
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
RUN useradd --system --home /var/lib/sluice --create-home sluice
COPY --from=build /out/ /usr/local/bin/
USER sluice
WORKDIR /var/lib/sluice
ENV SLUICE_LOG_FORMAT=json
EXPOSE 50051 9600
CMD ["sluice-gateway"]
