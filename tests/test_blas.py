"""OpenBLAS interposition: each case runs in a fresh interpreter, since the
BLAS must be chosen before mlx.core is first imported."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxd.server.blas import ACCELERATE, BUNDLED, INSTALL_HINT, BlasInfo, describe, find_openblas

ROOT = Path(__file__).resolve().parents[1]
OPENBLAS = find_openblas()
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="BLAS interposition is Linux-only")
needs_openblas = pytest.mark.skipif(
    sys.platform != "linux" or OPENBLAS is None,
    reason=f"no system OpenBLAS installed ({INSTALL_HINT})",
)

SETUP = """
import json, dataclasses
from mlxd.server.blas import setup_blas
info = dataclasses.asdict(setup_blas())
"""

# A tiny random qwen2, greedy-decoded from fixed token ids: float32, so every
# matmul goes through cblas_sgemm.
GREEDY = SETUP + """
import mlx.core as mx
from mlx_lm.models import qwen2
from mlx_lm.models.cache import make_prompt_cache

mx.random.seed(0)
args = qwen2.ModelArgs(model_type="qwen2", hidden_size=64, num_hidden_layers=2,
    intermediate_size=128, num_attention_heads=4, rms_norm_eps=1e-6,
    vocab_size=256, num_key_value_heads=2, tie_word_embeddings=False)
model = qwen2.Model(args)
cache = make_prompt_cache(model)
logits = model(mx.array([[(7 * i) % 256 for i in range(48)]]), cache=cache)[:, -1]
first = logits[0].tolist()
tokens = []
for _ in range(24):
    token = mx.argmax(logits, axis=-1)
    tokens.append(token.item())
    logits = model(token[None], cache=cache)[:, -1]
print(json.dumps({"info": info, "tokens": tokens, "first_logits": first}))
"""


def bundled_blas_path() -> str | None:
    """The reference BLAS inside the mlx[cpu] wheel (mlx_cpu.libs/libblas-*.so*), if that is the layout."""
    spec = importlib.util.find_spec("mlx")
    libs = Path(next(iter(spec.submodule_search_locations))).parent / "mlx_cpu.libs"
    return next((str(p) for p in sorted(libs.glob("libblas-*.so*"))), None)


def run_python(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter from the repo root; it prints one JSON object."""
    child_env = {k: v for k, v in os.environ.items() if k not in ("MLXD_BLAS", "LD_PRELOAD")}
    child_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=child_env,
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def blas_info(code: str = SETUP + "print(json.dumps(info))", **env: str) -> dict:
    return run_python(code, **env)


@needs_openblas
def test_system_openblas_is_used_by_default():
    info = blas_info()
    assert info["interposed"] is True
    assert info["library"] == OPENBLAS
    assert info["reason"] == ""
    assert info["gflops"] > 0


@needs_openblas
def test_explicit_path_is_loaded():
    info = blas_info(MLXD_BLAS=OPENBLAS)
    assert (info["library"], info["interposed"]) == (OPENBLAS, True)


@linux_only
def test_off_keeps_the_bundled_blas():
    info = blas_info(MLXD_BLAS="off")
    assert (info["library"], info["interposed"]) == (BUNDLED, False)
    assert "MLXD_BLAS=off" in info["reason"]


@linux_only
def test_unloadable_path_falls_back_to_bundled():
    info = blas_info(MLXD_BLAS="/nonexistent/libopenblas.so.0")
    assert (info["library"], info["interposed"]) == (BUNDLED, False)
    assert "could not load /nonexistent/libopenblas.so.0" in info["reason"]


@linux_only
def test_library_without_cblas_symbols_is_detected():
    # Loads fine but exports no cblas_sgemm, like scipy-openblas32's prefixed build.
    info = blas_info(MLXD_BLAS="libm.so.6")
    assert (info["library"], info["interposed"]) == (BUNDLED, False)
    assert "does not export cblas_sgemm" in info["reason"]


@needs_openblas
def test_preloaded_library_is_reported_over_the_loaded_one():
    preload = bundled_blas_path()
    if preload is None:
        pytest.skip("mlx wheel without mlx_cpu.libs/libblas-*.so")
    info = blas_info(LD_PRELOAD=preload)
    assert (info["library"], info["interposed"]) == (preload, True)
    assert info["reason"] == f"loaded earlier (e.g. LD_PRELOAD), it takes precedence over {OPENBLAS}"


@linux_only
def test_too_late_after_mlx_import():
    info = blas_info("import mlx.core\n" + SETUP + "print(json.dumps(info))")
    assert (info["library"], info["interposed"]) == (BUNDLED, False)
    assert "imported before setup_blas" in info["reason"]


@needs_openblas
def test_greedy_output_identical_with_and_without_openblas():
    fast = run_python(GREEDY)
    reference = run_python(GREEDY, MLXD_BLAS="off")
    assert fast["info"]["library"] == OPENBLAS
    assert reference["info"]["library"] == BUNDLED
    assert fast["tokens"] == reference["tokens"]
    assert fast["first_logits"] == pytest.approx(reference["first_logits"], abs=1e-4)


def test_describe_bundled_says_how_to_get_openblas():
    line = describe(BlasInfo(BUNDLED, interposed=False, gflops=3.2, reason="no system OpenBLAS found"))
    assert "bundled reference BLAS (no system OpenBLAS found)" in line
    assert "3.2 GFLOP/s" in line
    assert INSTALL_HINT in line


def test_describe_interposed_names_the_library():
    line = describe(BlasInfo("/usr/lib/libopenblas.so.0", interposed=True, gflops=85.0))
    assert line == "BLAS: /usr/lib/libopenblas.so.0, 85.0 GFLOP/s float32 256x256"


def test_describe_macos():
    assert "Accelerate" in describe(BlasInfo(ACCELERATE, interposed=False, gflops=None))
