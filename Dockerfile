# The sidecar container image. The proxy runs as uid/gid 1337, which the
# pod's iptables rules (iptables/, `sidecar-proxy init-iptables`) exempt from
# redirection so its own upstream connections are not looped back into it.

# The wheel is built where a C compiler is, so the data path is compiled with
# Cython (setup.py); the image that runs carries no compiler.
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY sidecar_proxy ./sidecar_proxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

WORKDIR /opt/sidecar-proxy
COPY --from=build /wheels /wheels
# iptables is for the init container (iptables/init-entrypoint.sh), which runs
# this same image with NET_ADMIN before the app starts.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY iptables/init-entrypoint.sh /usr/local/bin/sidecar-init
RUN pip install --no-cache-dir /wheels/*.whl \
 && rm -rf /wheels \
 && groupadd --gid 1337 sidecar \
 && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin sidecar

USER 1337:1337
# 15000 admin, 15001 outbound, 15006 inbound.
EXPOSE 15000 15001 15006
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar-proxy", "run"]
CMD ["--log-format", "json"]
