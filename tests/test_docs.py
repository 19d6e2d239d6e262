"""The docs against the code: docs/api.md names every public name, the README's Quickstart is two
commands, the version has one source."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pathlib
import re

import pytest

import swr_array

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "api.md").read_text()


def _documented(name: str) -> bool:
    return re.search(rf"`{re.escape(name)}[(`\s]", API) is not None


@pytest.mark.parametrize("module", ["swr_array", "swr_array.adapters.torch",
                                    "swr_array.adapters.jax"])
def test_api_md_names_every_public_name(module):
    if module.endswith("torch"):
        pytest.importorskip("torch")
    if module.endswith("jax"):
        pytest.importorskip("jax")
    mod = importlib.import_module(module)
    missing = [n for n in mod.__all__ if not _documented(n)]
    assert not missing, f"docs/api.md lacks {module}: {missing}"
    assert f"## `{module}`" in API


def test_api_md_names_every_reference_function():
    from swr_array import reference

    public = [n for n, f in vars(reference).items() if not n.startswith("_")
              and inspect.isfunction(f) and f.__module__ == reference.__name__]
    assert len(public) > 10
    missing = [n for n in public if f"`{n}(" not in API]
    assert not missing, f"docs/api.md lacks swr_array.reference: {missing}"


def test_api_md_signatures_show_the_defaults():
    for fn in ("swr", "swr_vjp"):
        sig = inspect.signature(getattr(swr_array, fn))
        assert sig.parameters["layout"].default == "BLHD"
        assert f"### `{fn}(" in API and "out=None" in API.split(f"### `{fn}(")[1].split("\n")[0]


def test_readme_quickstart_is_two_commands():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert len(blocks) == 2 and all(len(b.strip().splitlines()) == 1 for b in blocks), blocks
    assert "python -m swr_array demo" in blocks[0]
    assert "[test" in blocks[1] and "pytest" in blocks[1]
    assert "pip install swr-array" not in readme  # not published


def test_version_has_one_source():
    from swr_array import _version

    assert swr_array.__version__ == _version.__version__
    try:
        installed = importlib.metadata.version("swr-array")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("swr-array is not installed (only imported from the source tree)")
    assert installed == swr_array.__version__
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    attr = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "swr_array._version.__version__"
