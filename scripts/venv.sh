# Sourced by scripts/mlxd and scripts/test: make sure .venv exists and matches pyproject.toml.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.mlxd-installed-pyproject.toml"  # a copy of what was installed (no sha256sum on macOS)
if [ ! -x "$venv/bin/python" ]; then
    echo "mlxd: creating a virtual environment in $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv"
fi
if ! cmp -s "$root/pyproject.toml" "$stamp"; then
    echo "mlxd: installing mlxd and its dependencies into $venv (log: $venv/install.log)" >&2
    if ! { "$venv/bin/python" -m pip install --upgrade pip && "$venv/bin/python" -m pip install -e "$root[test]"; } \
        > "$venv/install.log" 2>&1; then
        tail -n 40 "$venv/install.log" >&2
        echo "mlxd: installation failed; the full log is $venv/install.log" >&2
        exit 1
    fi
    cp "$root/pyproject.toml" "$stamp"
fi
