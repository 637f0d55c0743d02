# syntax=docker/dockerfile:1
# refresherd as a container image. Build it from the repository root:
#   docker build -t refresherd .
# README.md ("Running as a docker sidecar") shows how to run it; deploy/compose.yaml runs it as
# the sidecar of an application, with Prometheus scraping it. The image holds no configuration
# and no secret: both are mounted read-only when it runs.
#   /etc/refresherd/config.toml  the config ([server] listen = "0.0.0.0:9469" in a container)
#   /run/secrets/NAME            client secrets (client_secret_file = "/run/secrets/NAME")
#   /var/lib/refresherd          the database: a volume, shared read-only with the application

# The base of both stages: the official Python image. The test suite, which reaches no registry
# but Debian's, passes a Debian base made with debootstrap that has the same `python`, venv and
# pip (.ci/run base-image; tests/test_deploy_image.py).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
WORKDIR /src
# Only what the package build needs; .dockerignore keeps everything else out of the context.
COPY pyproject.toml README.md ./
COPY refresherd ./refresherd
RUN python -m venv /opt/refresherd \
    && /opt/refresherd/bin/pip install --no-cache-dir --disable-pip-version-check '.[postgresql]'

FROM ${BASE_IMAGE}
# A fixed unprivileged uid and gid: the database is created 0600, so an application container
# reading it runs as the same uid (compose.yaml: user: "10001:10001").
RUN groupadd --system --gid 10001 refresherd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin refresherd \
    && install -d -m 0700 -o 10001 -g 10001 /var/lib/refresherd \
    && install -d -m 0755 /etc/refresherd
COPY --from=build /opt/refresherd /opt/refresherd
ENV PATH=/opt/refresherd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    REFRESHERD_CONFIG=/etc/refresherd/config.toml \
    REFRESHERD_HEALTHCHECK_URL=http://127.0.0.1:9469/healthz
# The database and its <database>.owners lock directory. A new named volume takes this
# directory's owner (10001) and mode (0700) from the image.
VOLUME ["/var/lib/refresherd"]
EXPOSE 9469
USER 10001:10001
# /healthz answers 200 while the event loop runs; any error or other status exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['REFRESHERD_HEALTHCHECK_URL'], timeout=4)"]
# Exec form: refresherd itself is PID 1. It installs its SIGTERM handler before it logs
# "refresherd started" (as PID 1, a signal without a handler would be ignored), drains in-flight
# refreshes for [daemon] shutdown_timeout (20s by default) and exits 0; stop it with a longer
# timeout than that (docker stop -t 30; compose: stop_grace_period). It starts no child process,
# so there are no zombies to reap and no init is needed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["refresherd"]
CMD ["run"]
