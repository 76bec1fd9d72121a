"""The package ships as designed: kernels/ inside fastpurify, the README commands are CI's."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_kernels_as_a_subpackage(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fastpurify", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--wheel-dir", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("fastpurify-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastpurify/kernels/__init__.py" in names
    assert "fastpurify/kernels/runtime.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "no top-level kernels package"
    top = {n.split("/")[0] for n in names}
    assert top == {"fastpurify", next(t for t in top if t.endswith(".dist-info"))}
    for sub in ("models", "backdoor", "data", "reference"):
        assert f"fastpurify/{sub}/__init__.py" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "fastpurify = fastpurify.cli:main" in entry


def test_installed_kernels_import_as_subpackage(tmp_path):
    """Outside the checkout (so the source tree is not on sys.path), the installed package
    provides fastpurify.kernels and claims no global `kernels`."""
    code = ("import importlib.util, fastpurify.kernels as k; "
            "print(k.__file__); print(importlib.util.find_spec('kernels'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kernels_file, global_spec = out.stdout.split("\n")[:2]
    assert Path(kernels_file).parent.name == "kernels" and global_spec == "None"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith(("#", "set ", "cd "))]
    assert commands == ["make test"]
    assert "make test" in readme and "make demo" in readme
