# The `cbt` image: the orchestrator (`cbt backup --pvc`, `cbt restore --to-pvc`, and every
# repository command), the replication controller `cbt-replicator`, and, built with
# `--target mover`, the data mover its Jobs run.
#
#   docker build -t cbt:dev .                         # orchestrator and CLI, runs as UID 65532
#   docker build --target mover -t cbt-mover:dev .    # mover Jobs: same binary, runs as root
#
# No ENTRYPOINT: Kubernetes objects say `command: ["cbt", ...]`, as the mover Jobs cbt creates
# do, and `docker run cbt:dev cbt --help` works the same way.
#
# Why two targets: a mover opens the PVC as a raw block device, which the container runtime
# creates owned by root (mode 0660). The mover Jobs cbt creates ask for uid 0 (with every
# capability dropped), so the default image works as the mover too; the `mover` target, whose
# default user is root, is for clusters where a policy rewrites the pod's runAsUser. The
# orchestrator needs no such access, so the default image runs unprivileged.

# Build: the toolchain the project is tested with. No protoc needed (protos compile in Rust).
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# --locked: build exactly the dependency versions of Cargo.lock.
RUN cargo build --release --locked -p cbt-cli -p cbt-replicator \
    && install -m 0755 target/release/cbt /cbt \
    && install -m 0755 target/release/cbt-replicator /cbt-replicator

# Runtime: glibc (the binary links it) and the CA roots that S3 over TLS and the Kubernetes
# API use; nothing else.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 cbt \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin cbt
COPY --from=builder /cbt /usr/local/bin/cbt
# The replication controller (examples/replication/deployment.yaml).
COPY --from=builder /cbt-replicator /usr/local/bin/cbt-replicator

FROM runtime AS mover
USER 0:0

# The default target (last): non-root, as cronjob.yaml and restore-job.yaml also require.
FROM runtime AS cbt
USER 65532:65532
