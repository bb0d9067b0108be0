"""One error type for every checkpoint problem, always naming the file."""

from __future__ import annotations

from pathlib import Path


class WeightsError(ValueError):
    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(path: str | Path) -> WeightsError:
    return WeightsError(path, "pickle checkpoint refused: loading a pickle can run arbitrary code. "
                              "Convert it to safetensors (or GGUF) with a tool you trust, then load that.")


def missing_weights(folder: str | Path, candidates: list[Path], what: str) -> WeightsError:
    """The error for a folder without safetensors weights: a pickle refusal if that is what it has."""
    pickles = [p for p in candidates if p.suffix in PICKLE_SUFFIXES]
    return refuse_pickle(pickles[0]) if pickles else WeightsError(folder, f"no {what}")
