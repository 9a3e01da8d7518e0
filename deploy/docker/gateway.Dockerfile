# syntax=docker/dockerfile:1
#
# The Keyward gateway: Cloudflare's keyless protocol on 2407, /metrics, /healthz and
# /readyz on 2406. Installs `keyward` without the signer extra, so the image holds no
# python-pkcs11 and no PKCS#11 module: a gateway never touches an HSM.
#
#   docker build -f deploy/docker/gateway.Dockerfile -t keyward-gateway .
#
# No configuration or secret is baked in. Give settings as KEYWARD_* variables or a
# mounted --config file, and mount the certificates (auth_cert, auth_key,
# cloudflare_ca_cert, signer_tls.*) at run time; see compose.yaml and
# deploy/kubernetes/gateway.yaml.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY signer/ signer/
# Wheels of Keyward and every dependency, so that the final stage installs offline and
# keeps no compiler, source tree or pip cache.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed uid/gid, the same in every Keyward image, so volumes shared between the
# services (compose.yaml) and Kubernetes fsGroup agree on ownership.
RUN groupadd --system --gid 10001 keyward \
    && useradd --system --uid 10001 --gid keyward --home-dir /var/lib/keyward \
        --no-create-home --shell /usr/sbin/nologin keyward \
    && install -d -o keyward -g keyward -m 0750 /var/lib/keyward /var/lib/keyward/pki \
    && install -d -o keyward -g keyward -m 0700 /run/keyward
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/keyward-*.whl
USER 10001:10001
WORKDIR /var/lib/keyward
EXPOSE 2407 2406
# /healthz on the operations endpoint (metrics_address:metrics_port, by default
# 127.0.0.1:2406, which is inside this container's network namespace).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["keyward", "health", "--quiet", "--http", "http://127.0.0.1:2406/healthz"]
ENTRYPOINT ["keyward"]
CMD ["gateway"]
