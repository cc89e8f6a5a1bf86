# claimgate container image.
#
#   docker build -t claimgate .
#   docker run --rm -p 127.0.0.1:8080:8080 -v claimgate-data:/var/lib/claimgate claimgate
#
# Stage 1 builds the release binary with Rust 1.95 (Cargo.toml: edition 2024,
# rust-version 1.94) against Cargo.lock (`--locked`: the build fails instead of resolving
# other versions). Stage 2 is a slim Debian of the same release, so
# the binary runs against the glibc it was linked with.
#
# The image runs as the unprivileged user `claimgate` (uid/gid 10001): a named volume
# inherits the right owner, a bind-mounted directory must be writable by 10001. Its default
# config, /etc/claimgate/claimgate.toml, is the embedded backend listening on
# 0.0.0.0:8080 with its append-only log and SQLite database in the volume
# /var/lib/claimgate. /etc/claimgate/redis.toml is the Redis + PostgreSQL config that
# docker-compose.yml uses. Mount your own file over either, or point CLAIMGATE_CONFIG
# (or --config) at another. CLAIMGATE_<SECTION>__<KEY> variables override the file.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src

# Dependencies first, in their own layer: build them against stub sources, so that a
# change to claimgate's own code does not rebuild the crates it depends on. Both workspace
# members need a manifest and their targets for Cargo to load the workspace; the stubs of
# loadtest/ stay (only the claimgate binary is built). `cargo clean --package claimgate`
# drops the stub's own artifacts, so the next step always compiles the real sources
# (COPY keeps the files' old mtimes, which Cargo could take for "up to date").
COPY Cargo.toml Cargo.lock ./
COPY loadtest/Cargo.toml loadtest/Cargo.toml
RUN mkdir -p src loadtest/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs loadtest/src/lib.rs \
    && echo 'fn main() {}' > loadtest/src/main.rs \
    && cargo build --release --locked --bin claimgate \
    && cargo clean --release --locked --package claimgate \
    && rm -rf src

# The real sources: everything the crate compiles in (the Lua scripts, the migrations and
# the OpenAPI document are embedded with include_str!/migrate!).
COPY src src
COPY lua lua
COPY migrations migrations
COPY docs docs
RUN cargo build --release --locked --bin claimgate \
    && install -D -m 0755 target/release/claimgate /out/claimgate

# ---------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

# curl is for the HEALTHCHECK (and an operator's `docker exec ... curl`); nothing else is
# needed at run time (claimgate links only glibc, libgcc and libm dynamically).
# DL3008 (pin apt versions) is ignored on purpose: the base image tag fixes the Debian
# release, and a pinned package version vanishes from the archive at the next point
# release, which would break every later build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 claimgate \
    && useradd --system --uid 10001 --gid claimgate --home-dir /var/lib/claimgate \
        --no-create-home --shell /usr/sbin/nologin claimgate \
    && install -d -o claimgate -g claimgate -m 0750 /var/lib/claimgate

COPY --from=builder /out/claimgate /usr/local/bin/claimgate
COPY packaging/docker/claimgate.toml packaging/docker/redis.toml /etc/claimgate/
COPY LICENSE /usr/share/doc/claimgate/LICENSE

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="claimgate" \
      org.opencontainers.image.description="Redis-native, high-concurrency coupon claim gateway" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

ENV CLAIMGATE_CONFIG=/etc/claimgate/claimgate.toml
WORKDIR /var/lib/claimgate
VOLUME ["/var/lib/claimgate"]
# Numeric, so that runtimes checking runAsNonRoot (Kubernetes) can verify it.
USER 10001:10001
EXPOSE 8080

# Liveness: the process serves HTTP. (/readyz is readiness: it turns 503 while Redis or the
# database is unreachable or the instance drains; point load balancers at it, not Docker.)
# Assumes the container listens on port 8080, as the shipped configs do.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "--max-time", "2", "http://127.0.0.1:8080/healthz"]

# SIGTERM: stop accepting, finish the claims in flight, flush the persister and the
# embedded log, exit within server.shutdown_grace_ms (10 s by default): give `docker stop`
# more than that (`docker stop -t 15`, compose `stop_grace_period`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/claimgate"]
CMD ["serve"]
