"""The package's shape: every import points down, modules stay small, thin clients stay thin."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import edge

PACKAGE = Path(edge.__file__).parent
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(["edge", *parts])] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere (also inside functions), except for type checking."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    targets = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    return {t for t in targets if t in known and t != name}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert graph["edge.cli"] and graph["edge.service"]  # the parser sees imports at all
    visiting, done = [], set()

    def visit(node: str) -> None:
        if node in done:
            return
        assert node not in visiting, "import cycle: " + " -> ".join(visiting[visiting.index(node):] + [node])
        visiting.append(node)
        for target in sorted(graph[node] - {"edge"}):  # edge/__init__ holds only the version
            visit(target)
        visiting.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def _transport(name: str) -> str:
    """edge.comms.<transport>[.<its modules>]: a front end may be one module or a package of them."""
    return ".".join(name.split(".")[:3])


def _is_front_end(path: Path) -> bool:
    """A module that defines a front end: a class with the FrontEnd protocol's methods."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            if {"start", "stop_accepting", "close"} <= methods:
                return True
    return False


def test_front_ends_import_only_downward():
    modules = _modules()
    comms = [n for n in modules if n.startswith("edge.comms.")]
    transports = {_transport(n) for n in comms if _is_front_end(modules[n])}  # a module or package with a front end
    assert {"edge.comms.mqtt", "edge.comms.unix_socket", "edge.comms.http"} <= transports
    for name in comms:
        imported = _imports(name, modules[name], set(modules))
        assert not imported & {"edge.daemon", "edge.cli"}, (name, imported)
        # a front end's helper modules (images, Home Assistant) are fine; another transport's modules are not
        others = {i for i in imported if _transport(i) in transports and _transport(i) != _transport(name)}
        assert not others, (name, others)


def test_no_module_is_long():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_submit_history_and_help_import_neither_onnxruntime_nor_numpy_nor_the_http_server():
    nowhere = "/nonexistent/edge-imagegen.sock"
    for argv, status in ((["submit", "--help"], 0), (["--help"], 0), (["submit", "a gear", "--socket", nowhere], 2),
                         (["history", "--help"], 0), (["history", "--socket", nowhere], 2)):
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "edge.cli", *argv], cwd="/",
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == status, run.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if "|" in line}
        assert "edge.config" in imported and "yaml" in imported  # importtime lists what was loaded
        heavy = {m for m in imported if m.split(".")[0] in ("onnxruntime", "numpy", "PIL", "aiohttp")}
        assert not heavy, f"{argv}: {sorted(heavy)[:5]}"


@pytest.mark.slow  # loads the model in a subprocess: seconds
def test_generate_does_not_import_the_http_server(tmp_path):
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "edge.cli", "generate", "a red gear", "--steps", "1",
                          "--out", str(tmp_path)], cwd="/", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if "|" in line}
    assert "onnxruntime" in imported and not {m for m in imported if m.split(".")[0] == "aiohttp"}
