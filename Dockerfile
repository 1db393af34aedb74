# The Outpost as a container image (docs/deploy.md, "Container image").
#
#   docker build -t jupyterhub-outpost .
#   docker build --build-arg EXTRA_PACKAGES="jupyterhub-kubespawner" -t jupyterhub-outpost .
#
# Build arguments:
#   BASE            the Python image both stages start from (Python >= 3.11 with venv)
#   EXTRAS          extras of this project to install, e.g. "demo"
#   EXTRA_PACKAGES  more pip requirements into the Outpost's venv: the site's Spawner
#                   (jupyterhub-kubespawner, batchspawner, ...) or, for notebooks that run
#                   inside this container, "jupyter-server" (jupyterhub-singleuser needs it)
#   APT_PACKAGES    Debian packages for the final stage: what the site's Spawner calls, e.g.
#                   "slurm-client" for batchspawner (sbatch, squeue, scancel; mount the site's
#                   slurm.conf and munge socket at run time)
# A pip behind a TLS-intercepting proxy gets its CA bundle as a build secret (never in a
# layer): --secret id=pipca,src=/etc/ssl/certs/ca-certificates.crt
#
# Volumes: /var/lib/jupyterhub-outpost (state: the SQLite database, the SSH host key,
# internal_ssl certificates; the working directory) and /etc/jupyterhub-outpost (the config
# file outpost_config.py, TLS files, the crypt key file). The key comes from
# OUTPOST_CRYPT_KEY or c.Outpost.crypt_key_file. The root filesystem may be read-only
# (docker run --read-only --tmpfs /tmp).

ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS builder
ARG EXTRAS=""
ARG EXTRA_PACKAGES=""
# tini-static: copied into the final stage, which then needs no apt run of its own
# the base's Debian release pins tini's version
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/outpost
COPY pyproject.toml README.md /src/
COPY outpost_client /src/outpost_client
COPY outpost_server /src/outpost_server
RUN --mount=type=secret,id=pipca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi \
    && /opt/outpost/bin/pip install --disable-pip-version-check "/src${EXTRAS:+[$EXTRAS]}" $EXTRA_PACKAGES \
    && /opt/outpost/bin/pip uninstall --yes pip \
    && find /opt/outpost -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE}
ARG APT_PACKAGES=""
# only when asked for (the default image runs no apt); the base's Debian release pins the
# versions, and the list is meant to split into words
# hadolint ignore=DL3008,SC2086
RUN if [ -n "$APT_PACKAGES" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends $APT_PACKAGES \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=builder /usr/bin/tini-static /usr/bin/tini
COPY --from=builder /opt/outpost /opt/outpost
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /var/lib/jupyterhub-outpost \
        --shell /usr/sbin/nologin outpost \
    && mkdir -p /var/lib/jupyterhub-outpost /etc/jupyterhub-outpost \
    && chown outpost:outpost /var/lib/jupyterhub-outpost \
    && chmod 0700 /var/lib/jupyterhub-outpost
ENV PATH=/opt/outpost/bin:$PATH \
    HOME=/var/lib/jupyterhub-outpost \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OUTPOST_HEALTH_PORT=50052
VOLUME ["/var/lib/jupyterhub-outpost", "/etc/jupyterhub-outpost"]
WORKDIR /var/lib/jupyterhub-outpost
USER 1000:1000
# gRPC, the embedded SSH forwarder; the health-only port listens on loopback
EXPOSE 50051 2222
# the gRPC health service on the plaintext health-only port (c.Outpost.health_port, set
# below): the main port wants a client certificate this check does not have
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["python3", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; channel = grpc.insecure_channel('127.0.0.1:' + os.environ['OUTPOST_HEALTH_PORT']); reply = g.HealthStub(channel).Check(h.HealthCheckRequest(), timeout=4); sys.exit(reply.status != h.HealthCheckResponse.SERVING)"]
# tini is PID 1: it reaps the notebooks' orphans and passes SIGTERM on to the Outpost
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["sh", "-c", "exec jupyterhub-outpost -f /etc/jupyterhub-outpost/outpost_config.py --Outpost.health_port=$OUTPOST_HEALTH_PORT"]
