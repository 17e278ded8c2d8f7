"""mlxd's inference runtime: model lifecycle, prompt building, generation, output parsing, CLI."""
