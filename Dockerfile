# raftcache node image: `docker build -t raftcache:latest .` from the repository root.
#
# Two stages: the first installs the package and its dependencies into a virtualenv (every
# compiled dependency -- gevent, greenlet, cryptography, thriftpy2, hiredis -- ships wheels for
# CPython 3.11 on glibc, so no compiler is needed); the second copies only that virtualenv, so
# the source tree and the build context never reach the image.

FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY raftcache ./raftcache
# `.` is this build context, the one version being built: there is nothing to pin.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib


FROM python:3.11-slim-bookworm

# A fixed UID/GID, so that Kubernetes' runAsUser/fsGroup and volume ownership can name it.
ARG UID=10001
ARG GID=10001
RUN groupadd --system --gid "${GID}" raftcache \
    && useradd --system --uid "${UID}" --gid raftcache --no-create-home \
       --home-dir /var/lib/raftcache --shell /usr/sbin/nologin raftcache \
    && mkdir -p /etc/raftcache /var/lib/raftcache \
    && chown raftcache:raftcache /var/lib/raftcache \
    && chmod 0700 /var/lib/raftcache

COPY --from=build /opt/venv /opt/venv

# No .pyc written at run time: the root filesystem may be read-only (bytecode is compiled above).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER ${UID}:${GID}
WORKDIR /var/lib/raftcache
VOLUME ["/var/lib/raftcache"]

# 7400: clients and peers (node.address); 9400: /metrics, /healthz, /readyz (metrics_address).
EXPOSE 7400 9400

# For `docker run`. Kubernetes ignores HEALTHCHECK: examples/kubernetes/ probes /healthz and
# /readyz over HTTP instead. This asks the metrics port that the default command opens.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=3)"]

ENTRYPOINT ["raftcache"]
# The config is mounted at /etc/raftcache/raftcache.toml ([encryption] names a keyring, or says
# enabled = false); `docker run IMAGE serve --config ... --id 2 ...` overrides the rest.
CMD ["serve", "--config", "/etc/raftcache/raftcache.toml", "--metrics-address", "0.0.0.0:9400"]
