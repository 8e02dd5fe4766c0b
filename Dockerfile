# syntax=docker/dockerfile:1
# drawdown: multi-stage build. The build stage compiles RocksDB and librdkafka (about 15 min on
# 2 cores the first time; BuildKit cache mounts keep later builds incremental); the runtime stage
# is debian:bookworm-slim with the binary, the default config and a non-root user.
#   docker build -t drawdown .
#   docker run --rm -p 8080:8080 -e DRAWDOWN__KAFKA__BOOTSTRAP_SERVERS=broker:9092 drawdown

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
# libclang for RocksDB's bindgen, protoc for prost (see README, "First run").
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY benches benches
COPY src src
COPY crates crates
COPY docs/openapi.json docs/openapi.json
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin drawdown --bin drawdown-loadgen \
 && cp target/release/drawdown target/release/drawdown-loadgen /usr/local/bin/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/drawdown --no-create-home drawdown \
 && mkdir -p /var/lib/drawdown /etc/drawdown \
 && chown drawdown:drawdown /var/lib/drawdown
COPY --from=build /usr/local/bin/drawdown /usr/local/bin/drawdown-loadgen /usr/local/bin/
COPY config/drawdown.toml /etc/drawdown/drawdown.toml
# Container defaults; every config key stays overridable as DRAWDOWN__SECTION__KEY.
# The API is reachable from outside the container: no unauthenticated mode (the example config's
# local-development setting); set DRAWDOWN__API__KEYS (and DRAWDOWN__API__PORTAL_SECRET).
ENV DRAWDOWN_CONFIG=/etc/drawdown/drawdown.toml \
    DRAWDOWN__API__LISTEN=0.0.0.0:8080 \
    DRAWDOWN__API__ALLOW_UNAUTHENTICATED=false \
    DRAWDOWN__STORE__PATH=/var/lib/drawdown/state \
    RUST_LOG=info,rdkafka=warn
USER 10001:10001
WORKDIR /var/lib/drawdown
VOLUME /var/lib/drawdown
EXPOSE 8080
# SIGTERM drains, commits and leaves the group (give it pipeline.shutdown_timeout + margin).
STOPSIGNAL SIGTERM
ENTRYPOINT ["drawdown"]
CMD ["run", "--log-format", "json"]
