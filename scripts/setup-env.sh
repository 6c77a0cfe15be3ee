# Shared by quickstart.sh and test.sh: Debian packages and the virtualenv.

apt_install() {  # needs root or sudo; waits for another apt/dpkg run to let go of its lock
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: $*" >&2
  local try
  for try in 1 2 3 4 5 6 7 8 9 10; do
    if $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
        -o DPkg::Lock::Timeout=120 "$@" >/dev/null; then
      return 0
    fi
    echo "apt-get failed (another install holding the dpkg lock?); retrying in 15 s ($try/10)" >&2
    sleep 15
  done
  return 1
}

ensure_python() {  # Debian's python3 needs python3-venv for `python3 -m venv`
  python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3 python3-venv
}

ensure_mosquitto() {  # the broker and its clients for the MQTT tests
  { command -v mosquitto || [ -x /usr/sbin/mosquitto ]; } >/dev/null 2>&1 \
    && command -v mosquitto_pub >/dev/null 2>&1 || apt_install mosquitto mosquitto-clients
}

ensure_chromium() {  # a real browser and its WebDriver for the page's Selenium tests
  [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || apt_install chromium chromium-driver
}

make_venv() {  # make_venv PIP_TARGET: create .venv if needed and install the project into it
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q "$1"
}
