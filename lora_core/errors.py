"""Typed errors. Each carries what a person needs to fix the problem: the file and what is wrong."""
from __future__ import annotations


class LoraError(Exception):
    """Base class of every error lora_core raises on purpose."""


class LoraFileError(LoraError):
    """A file could not be read as a LoRA: missing, truncated, bad header, pickle, non-tensor data, NaN/Inf."""

    def __init__(self, path: str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class KeyMappingError(LoraError):
    """The keys of a file could not be matched to the layers of the loaded model."""


class FamilyMismatchError(LoraError):
    """A LoRA made for one model family (SD1, SD2, SDXL, the SDXL refiner, SD3) was applied to another.
    ``file_name`` and ``model_name`` are the families as a person reads them (``families.family_name``)."""

    def __init__(self, path: str, file_family: str, model_family: str, file_name: str = "", model_name: str = ""):
        self.path = str(path)
        self.file_family = file_family
        self.model_family = model_family
        super().__init__(f"{self.path}: this LoRA is for {file_name or file_family.upper()}, the loaded model is "
                         f"{model_name or model_family.upper()}")


class BlockWeightError(LoraError, ValueError):
    """An ``lbw``/``lbwe`` cannot be applied as written: an unknown preset or block, a bad value, or a list whose
    length does not fit the loaded model. The LoRA is skipped rather than applied without its block weights."""


class UnsupportedLayerError(LoraError):
    """An adapter's keys were found for a layer it cannot be applied to (type or shape)."""


class NonFiniteWeightError(LoraError):
    """Applying would have written NaN or Inf into the model's weights; nothing was written."""


class LoraNotFoundError(LoraError):
    """No LoRA in the library answers to a name (file stem or alias); carries close matches to suggest."""

    def __init__(self, name: str, close_matches: "list[str] | tuple[str, ...]" = (), reason: str = ""):
        self.name = name
        self.close_matches = list(close_matches)
        message = reason or f"no LoRA named '{name}' was found (names are file names without extension, or aliases)"
        if self.close_matches:
            message += "; did you mean: " + ", ".join(f"'{m}'" for m in self.close_matches) + "?"
        super().__init__(message)


class AmbiguousNameError(LoraError):
    """A name matches several LoRA files (same file name in two folders, or a shared alias); carries their paths."""

    def __init__(self, name: str, paths: "list[str] | tuple[str, ...]", hint: str = ""):
        self.name = name
        self.paths = [str(p) for p in paths]
        message = f"the name '{name}' matches {len(self.paths)} LoRA files: " + ", ".join(self.paths)
        if hint:
            message += f". {hint}"
        super().__init__(message)
