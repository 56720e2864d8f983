"""The package layout and which module may import which (docs/ARCHITECTURE.md), checked on the sources."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_installed_inside_cinemo_rt():
    tool = _pyproject()["tool"]["setuptools"]
    mapped = tool["package-dir"]
    assert mapped == {"cinemo_rt.export": "export"}
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cinemo_rt").rglob("__init__.py")}
    folders |= {name for name, folder in mapped.items() if (ROOT / folder / "__init__.py").is_file()}
    # kernels/ has no __init__.py (a regular top-level `kernels` package would shadow Hugging Face's, which
    # transformers imports): it is the namespace package cinemo_rt._kernels through the link cinemo_rt/_kernels.
    assert (ROOT / "cinemo_rt" / "_kernels").resolve() == (ROOT / "kernels").resolve()
    assert not (ROOT / "kernels" / "__init__.py").exists()
    folders.add("cinemo_rt._kernels")
    assert set(tool["packages"]) == folders
    assert all(name == "cinemo_rt" or name.startswith("cinemo_rt.") for name in tool["packages"])


def _imports(path: Path) -> set[str]:
    """Absolute names a module imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


def _modules(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("rule", [
    # (modules, forbidden import prefixes, why)
    ("cinemo_rt", ("export", "kernels"), "the runtime never imports the build or kernels by top-level name"),
    ("cinemo_rt/backends", ("cinemo_rt.pipeline", "cinemo_rt.stages", "cinemo_rt.cli", "cinemo_rt.request"),
     "backends sit below the pipeline"),
    ("cinemo_rt/train", ("cinemo_rt.testing",), "training does not import the test fixtures"),
])
def test_import_directions(rule):
    folder, forbidden, why = rule
    problems = [f"{p.relative_to(ROOT)} imports {name}" for p in _modules(folder) for name in _imports(p)
                if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert not problems, f"{why}: " + "; ".join(problems)


def test_single_modules_import_only_downwards():
    assert not {n for n in _imports(ROOT / "cinemo_rt/checkpoint.py") if n.startswith("cinemo_rt.sampling")}
    manifest = _imports(ROOT / "cinemo_rt/manifest.py")
    assert not {n for n in manifest if n.startswith("cinemo_rt.backends") and not n.startswith("cinemo_rt.backends.base")}


def test_the_cli_parses_without_importing_torch():
    """Its choices come from light registries (backends, samplers), so `--help` and bad flags are instant."""
    import subprocess

    code = "import sys, cinemo_rt.cli as c; c.build_parser(); assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
