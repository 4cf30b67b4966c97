#!/bin/sh
# The system tool the deployment tests drive: docker-compose 1.29 (validates the compose files
# without a Docker engine; the router is a Python package, installed with the dev extra).
# Installs it only when missing, with apt-get, as root; as any other user it says what is
# missing and how to install it.
set -eu

missing=""
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    cat >&2 <<MESSAGE
The deployment tests (tests/test_deploy_*.py) need docker-compose; missing:$missing.
Install it, then run \`make test\` again. On Debian or Ubuntu:

    sudo apt-get install -y --no-install-recommends$missing

(Run as root on Debian or Ubuntu, \`make test\` installs it itself.)
MESSAGE
    exit 1
fi
echo "installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086  # one word per package
apt-get install -y -q --no-install-recommends $missing
