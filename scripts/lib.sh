# Shared by scripts/dev.sh and scripts/test.sh: install what a fresh machine lacks.
# Installs use Debian's packages (apt-get) when running as root; otherwise they say what to run.

need_root_or_say() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: $1 is missing; install it with: sudo apt-get install -y $2" >&2
    exit 1
  fi
}

apt_install() {
  # apt-get update once per run, then install
  if [ -z "${_APT_UPDATED:-}" ]; then
    apt-get update -qq >/dev/null
    _APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_redis_server() {
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    need_root_or_say redis-server redis-server
    echo "installing redis-server (apt-get install -y redis-server)" >&2
    apt_install redis-server
  fi
}

ensure_node() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    need_root_or_say "node/npm" "nodejs npm"
    echo "installing nodejs and npm" >&2
    apt_install nodejs npm
  fi
}

ensure_test_client() {
  # the official phoenix client and ws, pinned by tests/package-lock.json
  ensure_node
  if [ ! -d tests/node_modules/phoenix ] || [ tests/package-lock.json -nt tests/node_modules/.package-lock.json ]; then
    (cd tests && npm ci --no-audit --no-fund --loglevel=error)
  fi
}

ensure_prometheus() {
  # the dashboard test runs Debian's prometheus binary itself (on a free port, private config and
  # storage); the package's system service is not used, and the recommended node exporter is not
  # installed. The alert test runs the same package's promtool
  if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    need_root_or_say prometheus prometheus
    echo "installing prometheus (apt-get install -y --no-install-recommends prometheus)" >&2
    apt_install --no-install-recommends prometheus
  fi
}

ensure_chromium() {
  # the browser test drives Debian's chromium with playwright-core (no browser download)
  if [ ! -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ]; then
    need_root_or_say chromium chromium
    echo "installing chromium (apt-get install -y chromium)" >&2
    apt_install chromium
  fi
}
