"""The systemd units: valid for systemd itself, hardened, and in agreement with the daemon."""

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edge.config import load_config
from edge.paths import SYSTEMD_SOCKET

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SERVICE, SOCKET = UNITS / "edge-imagegen.service", UNITS / "edge-imagegen.socket"
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed (Debian package systemd)")


def unit(path):
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_service_is_type_notify_with_watchdog_and_state_directories():
    s = unit(SERVICE)["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert int(s["WatchdogSec"]) > 0 and s["Restart"] == "on-failure"
    assert " serve " in s["ExecStart"] + " "
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"  # SIGHUP: the daemon reloads its policy and limits
    assert s["StateDirectory"] == s["RuntimeDirectory"] == "edge-imagegen"
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes"
    assert "MemoryMax" in s and "MemoryHigh" in s
    # the unit must give the running job its daemon.stop_timeout and then some
    assert int(s["TimeoutStopSec"]) > load_config().daemon.stop_timeout


def test_socket_unit_is_where_the_client_looks_and_group_writable():
    s = unit(SOCKET)["Socket"]
    assert s["SocketMode"] == "0660"
    assert Path(s["ListenStream"]) == SYSTEMD_SOCKET  # the first place `edge-imagegen submit` looks


@needs_systemd_analyze
def test_units_verify_without_warnings_about_their_keys():
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(SERVICE), str(SOCKET)],
                          capture_output=True, text=True)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "is not executable" not in line]  # ExecStart's venv exists only on an installed device
    assert problems == []


@needs_systemd_analyze
def test_security_exposure_is_at_most_2():
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(SERVICE)],
                          capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0
