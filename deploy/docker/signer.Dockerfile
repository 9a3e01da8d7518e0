# syntax=docker/dockerfile:1
#
# A Keyward signer: the Signer gRPC API (2410, mutual TLS) over one PKCS#11 token.
# Installs keyward[signer] (python-pkcs11). The HSM vendor's PKCS#11 module is not
# here: put it at /opt/pkcs11/lib/ (the path the example configs use) either by
# mounting it, or in a derived image:
#
#   FROM keyward-signer
#   USER root
#   COPY --chmod=0755 libvendor-pkcs11.so /opt/pkcs11/lib/libpkcs11.so
#   # plus the client configuration and libraries the vendor's module needs
#   USER 10001:10001
#
#   docker build -f deploy/docker/signer.Dockerfile -t keyward-signer .
#
# No configuration, PIN or certificate is baked in: the PKCS#11 URI names the PIN
# through pin-source=file:/run/secrets/... or env:NAME, mounted or set at run time.
#
# The health check asks grpc.health.v1 over the signer's Unix socket, so configure
# unix_socket: /run/keyward/signer.sock (KEYWARD_UNIX_SOCKET), as compose.yaml and
# deploy/kubernetes/signer.yaml do. The TCP port cannot be probed without a client
# certificate, and the socket needs none: its file permissions are its access control.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY signer/ signer/
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[signer]"

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 keyward \
    && useradd --system --uid 10001 --gid keyward --home-dir /var/lib/keyward \
        --no-create-home --shell /usr/sbin/nologin keyward \
    && install -d -o keyward -g keyward -m 0750 /var/lib/keyward /var/lib/keyward/pki \
    && install -d -o keyward -g keyward -m 0700 /run/keyward \
    && install -d -m 0755 /opt/pkcs11/lib
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels \
        "$(ls /wheels/keyward-*.whl)[signer]"
USER 10001:10001
WORKDIR /var/lib/keyward
EXPOSE 2410 2411
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["keyward", "health", "--quiet", "--signer", "unix:/run/keyward/signer.sock"]
ENTRYPOINT ["keyward"]
CMD ["signer"]
