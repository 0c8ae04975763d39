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
            "psutil",  # the reaper: a command's processes, to stop what outlives it
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


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for layer in PROJECT for path in files_of(layer)}


def project_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports anywhere in it, function bodies included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from pipelines import cache` imports the module pipelines.cache
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found & set(modules)


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for following in sorted(graph[node]):
            if state.get(following) == "open":
                return [*path[path.index(following) :], following]
            if following not in state and (found := visit(following, [*path, following])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycle_among_project_modules():
    modules = project_modules()
    graph = {name: project_imports(path, modules) - {name} for name, path in modules.items()}
    assert import_cycle(graph) is None, " -> ".join(import_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


LONG_FUNCTION = 80  # lines; a longer function in pipelines/ says why in a comment on its first line


def test_pipeline_functions_are_short_or_say_why():
    for path in files_of("pipelines") + files_of("cli"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                header = lines[node.lineno - 1]
                assert length <= LONG_FUNCTION or "# long:" in header, (
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.name} has {length} lines: split it, "
                    "or say why it is long in a '# long: ...' comment on its def line"
                )


def test_the_training_step_needs_no_ray():
    assert "ray" not in {name.split(".")[0] for name in imports_of(ROOT / "pipelines" / "trainer.py")}


# One per command; see pipelines/__init__.py.
JOBS = {"preprocess", "train", "sample", "serve", "bucket_report", "demo_eval", "demo_vae", "batch_search"}
# Serving runs the sampler; the demo VAE's fit is judged by the demo's judge.
JOB_IMPORTS_ALLOWED = {("serve", "sample"), ("demo_vae", "demo_eval")}


def test_job_modules_import_shared_modules_not_each_other():
    modules = project_modules()
    for job in sorted(JOBS):
        for name in project_imports(modules[f"pipelines.{job}"], modules):
            other = name.removeprefix("pipelines.")
            if other in JOBS and other != job:
                assert (job, other) in JOB_IMPORTS_ALLOWED, f"pipelines/{job}.py imports {name}: move what both need"
