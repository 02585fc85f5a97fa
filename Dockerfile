# The gateway's container image: a release build with the locked dependencies, run as a non-root
# user on a slim Debian with only the binary and the documented default settings.
#
#   docker build -t registry.example.com/gateway:0.1.0 .
#   docker push registry.example.com/gateway:0.1.0
#   docker run --rm -p 4000:4000 -p 4001:4001 -e GATEWAY_REDIS_URL=redis://host:6379 \
#     -e GATEWAY_AUTH_HS256_SECRET=... registry.example.com/gateway:0.1.0
#
# deploy/kubernetes/deployment.yaml runs this image; tests/deploy.test.mjs checks this file against
# it (ports, user, config path, probes, stop signal, every COPY source).

# --- build ----------------------------------------------------------------------------------------
# the workspace's rust-version (Cargo.toml): the oldest toolchain the locked dependencies build with
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY gateway ./gateway
# the Lua scripts are compiled into the binary (include_str!)
COPY lua ./lua
RUN cargo build --release --locked --package gateway --bin gateway

# --- run ------------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: the system roots a rediss:// URL is verified against
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /src/target/release/gateway /usr/local/bin/gateway
# the defaults, documented; Kubernetes mounts its ConfigMap over /etc/gateway
COPY config/gateway.toml /etc/gateway/gateway.toml
# the file's admin default (127.0.0.1) is unreachable from outside a container: health probes and
# Prometheus scrape the admin port through the pod's address. Keep that port off public networks.
ENV GATEWAY_ADMIN_LISTEN=0.0.0.0:4001
# numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
USER 10001:10001
# public WebSocket port (server.listen), admin port (admin.listen: /health/*, /metrics, rooms API)
EXPOSE 4000 4001
# SIGTERM starts the drain: readiness 503, server.drain_grace_ms, presence released, 1012 closes
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.toml"]
