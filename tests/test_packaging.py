"""The package as users get it: sdist and wheel build, pass twine check, and install cleanly."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*command: str | Path, cwd: Path = ROOT) -> str:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


# Builds a wheel and installs it with its dependencies into a new virtualenv: 60-100 s on two
# busy cores, too close to the suite's default 120 s limit.
@pytest.mark.timeout(300)
def test_wheel_installs_with_an_extra_into_a_clean_virtualenv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", dist, ROOT)
    wheels = list(dist.glob("*.whl"))
    sdists = list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1
    assert len(sdists) == 1
    run(sys.executable, "-m", "twine", "check", "--strict", *wheels, *sdists)
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "fastapi_websockets/py.typed" in names
    assert any(name.endswith("licenses/LICENSE") for name in names)
    assert not any(name.startswith("tests/") for name in names)

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", f"{wheels[0]}[redis]", cwd=tmp_path)
    out = run(
        python,
        "-c",
        "import fastapi_websockets, redis; from fastapi_websockets import RedisChannelLayer; "
        "print(fastapi_websockets.__version__, RedisChannelLayer.backend_name)",
        cwd=tmp_path,
    )
    assert out.split() == [
        run(sys.executable, "-c", "import fastapi_websockets; print(fastapi_websockets.__version__)").strip(),
        "redis",
    ]
