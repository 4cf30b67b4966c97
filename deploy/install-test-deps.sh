#!/bin/sh
# The system tools the deployment tests drive: nginx (the router) and docker-compose 1.29
# (validates the compose files without a Docker engine). Installs only what is missing.
set -eu

missing=""
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing="$missing nginx"
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "missing:$missing; run as root or: sudo apt-get install -y$missing" >&2
    exit 1
fi
echo "installing:$missing"
# nginx's package starts a system nginx on port 80 unless policy-rc.d forbids it; the tests
# start their own, so forbid it for the duration of the install.
own_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    own_policy=1
fi
trap '[ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086  # one word per package
apt-get install -y -q --no-install-recommends $missing
