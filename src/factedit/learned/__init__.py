"""Learned editors (MEND, KE): their networks, training, training data and artifacts.

``train_editor(model, tok, "mend", "cf", data=PATH)`` trains an editor for the model at hand
and stores it in the factedit cache; the methods ``mend``, ``mend-cf``, ... (see
:mod:`factedit.methods.learned`) then edit with it in one step.
"""

from .artifact import (
    EditorFileError,
    EditorMismatchError,
    EditorNotTrainedError,
    base_fingerprint,
    train_command,
)
from .config import KEHParams, LearnedHParams, MENDHParams
from .data import TrainExample, TrainingDataError
from .editor import LearnedEditor, ZeroGradientError
from .train import (
    TrainingDivergedError,
    TrainingInterrupted,
    TrainResult,
    build_examples,
    train_editor,
)

__all__ = [
    "EditorFileError",
    "EditorMismatchError",
    "EditorNotTrainedError",
    "KEHParams",
    "LearnedEditor",
    "LearnedHParams",
    "MENDHParams",
    "TrainExample",
    "TrainResult",
    "TrainingDataError",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "ZeroGradientError",
    "base_fingerprint",
    "build_examples",
    "train_command",
    "train_editor",
]
