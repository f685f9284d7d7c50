#!/bin/sh
# Entrypoint of the pod's init container (same image as the sidecar, run with
# NET_ADMIN before the app starts): install the interception rules, prove
# them, exit. Safe to run again after a restart. Extra arguments are
# init-iptables options, e.g. --inbound-mode tproxy --outbound-exclude-ports 25.
set -eu
exec sidecar-proxy init-iptables --verify "$@"
