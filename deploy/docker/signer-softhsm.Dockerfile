# syntax=docker/dockerfile:1
#
# DEVELOPMENT signer: the signer image plus Debian's SoftHSM2, a PKCS#11 token in
# files. compose.yaml uses it for the init service (`keyward dev-init`: token, keys,
# local PKI) and for both signers. SoftHSM2 keeps keys in ordinary files: never use
# this image for production keys; use deploy/docker/signer.Dockerfile and an HSM.
#
#   docker build -f deploy/docker/signer-softhsm.Dockerfile -t keyward-signer-softhsm .
#
# The module is /usr/lib/softhsm/libsofthsm2.so. SoftHSM2 reads its token directory
# from SOFTHSM2_CONF, which `keyward dev-init` writes next to the token
# (/var/lib/keyward/hsm/softhsm2.conf in compose.yaml).

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
# Debian's package versions move with the base image's point releases; pinning one
# would break the build at the next one, so the base image tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends softhsm2 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 keyward \
    && useradd --system --uid 10001 --gid keyward --home-dir /var/lib/keyward \
        --no-create-home --shell /usr/sbin/nologin keyward \
    && install -d -o keyward -g keyward -m 0750 /var/lib/keyward /var/lib/keyward/pki \
    && install -d -o keyward -g keyward -m 0700 /var/lib/keyward/hsm /var/lib/keyward/ca \
        /run/keyward
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
