"""Model zoo: hand-written reference models, presets of real sizes, and the MODEL resolver."""

from planner.models.cnn import CNN, CNNConfig
from planner.models.gpt import GPT, GPTConfig
from planner.models.loader import LoadedModel, ModelLoadError, load_model
from planner.models.mlp import MLP, MLPConfig
from planner.models.presets import PRESETS, Preset

__all__ = [
    "GPT",
    "GPTConfig",
    "MLP",
    "MLPConfig",
    "CNN",
    "CNNConfig",
    "PRESETS",
    "Preset",
    "LoadedModel",
    "ModelLoadError",
    "load_model",
]
