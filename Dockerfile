# syntax=docker/dockerfile:1
#
# drctl container image.
#   docker build -t drctl .
#   docker run --rm -e DRCTL_CONFIG=/etc/drctl/drctl.yaml -v /etc/drctl:/etc/drctl:ro drctl list
#
# The runtime image carries the clients that drctl's sources call: pg_dump and
# pg_restore (postgresql-client, version 15 on bookworm; dumping a newer server
# needs a newer client, e.g. from apt.postgresql.org), mariadb-dump, sqlite3,
# plus age and zstd for break-glass restores without drctl.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/drctl /usr/local/bin/drctl

FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates \
        age \
        zstd \
        tar \
        postgresql-client \
        mariadb-client \
        sqlite3 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 drctl \
    && useradd --system --uid 10001 --gid drctl --home-dir /var/lib/drctl \
        --no-create-home --shell /usr/sbin/nologin drctl \
    && install -d -o drctl -g drctl -m 0750 /var/lib/drctl \
    && install -d -m 0755 /etc/drctl

COPY --from=builder /usr/local/bin/drctl /usr/local/bin/drctl

ENV DRCTL_CONFIG=/etc/drctl/drctl.yaml
WORKDIR /var/lib/drctl
USER 10001:10001
# Prometheus /metrics and /healthz of `drctl daemon`.
EXPOSE 9184
ENTRYPOINT ["drctl"]
CMD ["--help"]
