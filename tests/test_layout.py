"""The layers of design.md: arrows point down only (checked on the source, without importing)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
PROJECT = {"bucketing", "sora_model", "pipelines", "cli"}

# Allowed third-party (top-level) imports per layer, and the project layers each may use.
RULES: dict[str, tuple[set[str], set[str]]] = {
    "bucketing": ({"numpy"}, {"bucketing"}),
    # flash_attn: the optional CUDA kernel, imported only when asked for and present.
    "sora_model": (
        {"torch", "diffusers", "transformers", "einops", "safetensors", "numpy", "tqdm", "flash_attn"},
        {"sora_model"},
    ),
    "pipelines": (
        {
            "torch",
            "diffusers",
            "transformers",
            "einops",
            "safetensors",
            "numpy",
            "ray",
            "pyarrow",
            "pandas",
            "decord",
            "av",
            "PIL",
            "tqdm",
            "deepspeed",
            "tensorboardX",
            "wandb",  # optional: only when wandb=True and installed
            "matplotlib",
            "starlette",  # Ray Serve's request and response types (installed with ray[serve])
        },
        {"bucketing", "sora_model", "pipelines"},
    ),
    "cli": ({"typer"}, {"pipelines"}),
}


def imports_of(path: Path) -> set[str]:
    """Dotted names imported anywhere in a file (function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files_of(layer: str) -> list[Path]:
    return [ROOT / "cli.py"] if layer == "cli" else sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_only_what_it_may(layer: str):
    third_party, project = RULES[layer]
    for path in files_of(layer):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in STDLIB:
                continue
            if top in PROJECT:
                assert top in project, f"{path.relative_to(ROOT)} imports {name}: {layer} may not use {top}"
            else:
                assert top in third_party, f"{path.relative_to(ROOT)} imports {name}, not allowed in {layer}"


def test_model_code_is_single_device():
    for path in files_of("sora_model"):
        for name in imports_of(path):
            assert not name.startswith("torch.distributed"), f"{path.relative_to(ROOT)} imports {name}"
        for node in ast.walk(ast.parse(path.read_text())):
            uses_distributed = (
                isinstance(node, ast.Attribute)
                and node.attr == "distributed"
                and isinstance(node.value, ast.Name)
                and node.value.id == "torch"
            )
            assert not uses_distributed, f"{path.relative_to(ROOT)}:{node.lineno} uses torch.distributed"


def test_top_level_layout():
    for name in ("pipelines", "sora_model", "bucketing", "configs", "tests", "benchmarks"):
        assert (ROOT / name).is_dir(), name
    for name in ("cli.py", "pyproject.toml", "README.md", "Makefile", ".ci/run"):
        assert (ROOT / name).is_file(), name
