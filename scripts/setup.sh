#!/usr/bin/env bash
# What a fresh machine needs for `make run`, `make test` and `.ci/run`, installed when missing.
# Idempotent: on a machine that has everything it only checks (well under a second).
#
#   scripts/setup.sh          the Debian packages and the Kafka jars
#   scripts/setup.sh --check  report what is missing, install nothing (exit 1 if anything is)
#
# Debian packages: libclang-dev (RocksDB's bindgen), protobuf-compiler (prost), kcat (broker
# checks), prometheus + jq + curl (ops checks), chromium + chromium-driver (the portal's browser
# test; the browser is never downloaded), python3-venv (schemathesis' venv, `make api-fuzz`). As root they are installed with apt-get; otherwise the
# script prints the exact apt-get line to run and stops. The toolchains (cargo, java, mvn, node,
# python3) are not installed here: it names the missing ones and stops.
# The Kafka jars come from Maven Central into ~/.cache/drawdown (deploy/kafka/kafka.sh fetch).
set -euo pipefail
cd "$(dirname "$0")/.."

CHECK=0
[[ "${1:-}" == "--check" ]] && CHECK=1

PACKAGES=(libclang-dev protobuf-compiler kcat prometheus jq curl chromium chromium-driver python3-venv)
missing=()
# One dpkg-query for all of them (a dpkg -s per package costs ~20 ms each).
installed=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)
for pkg in "${PACKAGES[@]}"; do
    grep -qx "$pkg installed" <<<"$installed" || missing+=("$pkg")
done

tools=()
for tool in cargo java mvn node npm python3; do
    command -v "$tool" >/dev/null || tools+=("$tool")
done
if ((${#tools[@]})); then
    echo "setup: missing toolchains: ${tools[*]} (Rust via rustup, Java 17 + Maven, Node 20, Python 3.11)" >&2
    exit 1
fi

if ((${#missing[@]})); then
    line="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ${missing[*]}"
    if ((CHECK)); then
        echo "setup: missing Debian packages: ${missing[*]}"
        exit 1
    fi
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: missing Debian packages: ${missing[*]}" >&2
        echo "setup: run as root, then try again:" >&2
        echo "  sudo sh -c '$line'" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]} (takes a minute or two, once)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ((CHECK)); then
    deploy/kafka/kafka.sh have-libs || { echo "setup: the Kafka jars are not fetched yet"; exit 1; }
    echo "setup: nothing missing"
else
    deploy/kafka/kafka.sh fetch
fi
