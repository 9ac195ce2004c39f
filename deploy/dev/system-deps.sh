#!/usr/bin/env bash
# Installs the Debian packages ecoworker's stack, demo and tests need, when missing.
# Runs as root on Debian/Ubuntu; elsewhere it says what to install and exits 0.
set -euo pipefail
want=(make rabbitmq-server postgresql tesseract-ocr tesseract-ocr-eng prometheus fonts-dejavu-core python3-venv python3-pip)
missing=()
for pkg in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-deps: please install: ${missing[*]}" >&2
    exit 0
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
