#!/bin/sh
# The system tools the tests drive: nginx (the front door) and docker-compose 1.29 (validates
# the compose files without a Docker engine) for the deployment tests, Debian's chromium for
# the playground's browser tests (Playwright drives it; it downloads no browser of its own), and
# on an x86 machine an AArch64 cross compiler and qemu-user, which build and run the CPU
# kernels' NEON variants (tests/test_kernel_variants.py). The cache-aware router, vllm-router,
# is a Python package that the dev extra installs. Installs only what is missing, with apt-get,
# as root; as any other user it says what is missing and how to install it.
set -eu

missing=""
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing="$missing nginx"
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
[ -x /usr/bin/chromium ] || missing="$missing chromium"
case "$(uname -m)" in
    aarch64 | arm64) ;; # the NEON variants build and run natively
    *)
        command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 ||
            missing="$missing gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
        command -v qemu-aarch64 >/dev/null 2>&1 || missing="$missing qemu-user"
        ;;
esac
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    cat >&2 <<MESSAGE
The deployment tests (tests/test_deploy_*.py) need nginx and docker-compose, the playground's
browser tests chromium, and the kernel variant tests an AArch64 cross compiler and qemu-user;
missing:$missing.
Install them, then run \`make test\` again. On Debian or Ubuntu:

    sudo apt-get install -y --no-install-recommends$missing

(Run as root on Debian or Ubuntu, \`make test\` installs them itself.)
MESSAGE
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
