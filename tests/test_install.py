"""The wheel installs one namespace, `mlxd`, and works from a fresh virtual environment.

The wheel is built from a copy of the checkout (an in-tree build would write `build/`
into it) and installed with `--no-deps` into a new venv; that venv finds the
dependencies through a path entry to this test environment's site-packages, added
after the install. A path entry (unlike a site directory) runs no `.pth` files, so
the editable checkout install of this environment stays invisible there.
"""

from __future__ import annotations

import ast
import email
import importlib.metadata
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.server_process import ROOT

PACKAGE_DIRS = ("server", "api", "registry")


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the fresh venv's bin directory)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in PACKAGE_DIRS:
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(source)])
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("mlxd-*.whl")

    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    install = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)])
    assert install.returncode == 0, install.stderr
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(site) / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return wheel, env_dir / "bin"


def test_the_wheel_holds_only_the_mlxd_namespace(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"mlxd", next(t for t in tops if t.endswith(".dist-info"))}
    for package in PACKAGE_DIRS:
        assert f"mlxd/{package}/__init__.py" in names
    assert "mlxd/__init__.py" not in names  # an implicit namespace package


def test_a_fresh_venv_imports_mlxd_and_nothing_generic(installed, tmp_path):
    _, bin_dir = installed
    imported = _run([str(bin_dir / "python"), "-c",
                     "import mlxd.server.cli, mlxd.api.app, mlxd.registry; print(mlxd.server.cli.__file__)"],
                    cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(str(bin_dir.parent))  # the wheel's copy, not the checkout
    for name in PACKAGE_DIRS:
        generic = _run([str(bin_dir / "python"), "-c", f"import {name}"], cwd=tmp_path)
        assert generic.returncode == 1 and f"No module named '{name}'" in generic.stderr


def test_the_installed_command_runs(installed, tmp_path):
    _, bin_dir = installed
    version = _run([str(bin_dir / "mlxd"), "--version"], cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"mlxd {_metadata(installed[0])['Version']}"
    help_text = _run([str(bin_dir / "mlxd"), "serve", "--help"], cwd=tmp_path)
    assert help_text.returncode == 0, help_text.stderr
    assert "--api-key" in help_text.stdout and "--model" in help_text.stdout


def _imported_distributions() -> dict[str, set[str]]:
    """Third-party modules the package's code imports (lazily or not) -> the distributions providing them."""
    modules = set()
    for package in PACKAGE_DIRS:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    owners = importlib.metadata.packages_distributions()
    third_party = modules - set(sys.stdlib_module_names) - {"mlxd", *PACKAGE_DIRS}
    return {m: {_canonical(d) for d in owners.get(m, [m])} for m in third_party}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _metadata(wheel: Path):
    archive = zipfile.ZipFile(wheel)
    name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    return email.message_from_bytes(archive.read(name))


def _declared(wheel: Path) -> dict[str, str | None]:
    """The wheel's runtime requirements: distribution -> its `>=` lower bound (None without one)."""
    declared = {}
    for requirement in _metadata(wheel).get_all("Requires-Dist"):
        spec, _, marker = requirement.partition(";")
        if "extra ==" in marker:
            continue
        lower = re.search(r">=\s*([0-9][^,\s]*)", spec)
        declared[_canonical(re.match(r"[A-Za-z0-9_.-]+", spec).group())] = lower and lower.group(1)
    return declared


def test_every_imported_distribution_is_declared_with_a_lower_bound_that_is_installed(installed):
    declared = _declared(installed[0])
    undeclared = {m: owners for m, owners in _imported_distributions().items() if not owners & set(declared)}
    assert not undeclared
    for name, lower in declared.items():
        if lower is None:
            continue
        installed = importlib.metadata.version(name)
        assert _version(installed) >= _version(lower), f"{name} {installed} is below the declared {lower}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_the_lowest_dependency_pins_are_the_declared_lower_bounds(installed):
    """tests/lowest-deps.txt is what the lower bounds were tested with; it must not drift from them."""
    declared = {name: lower for name, lower in _declared(installed[0]).items() if lower}
    lines = (ROOT / "tests" / "lowest-deps.txt").read_text().splitlines()
    pinned = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert {_canonical(k): v for k, v in pinned.items()} == declared
