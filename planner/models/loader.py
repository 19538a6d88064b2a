"""Resolve a MODEL argument into a module and its example inputs.

MODEL is one of:
  - a preset name (``gpt2``, ``llama-3-70b``; see ``PRESETS``),
  - ``hf:<model_type>`` built from the transformers config class with random weights,
  - ``path/to/file.py:factory`` or ``package.module:factory`` returning a model, optionally
    with example inputs: ``model``, ``(model, args)``, ``(model, args, kwargs)`` or a dict
    with keys ``model``, ``args``, ``kwargs``.

``overrides`` (the CLI's ``--set key=value``) change config fields of presets and ``hf:``
models.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from planner.arch import ModelArch
from planner.models.cnn import CNN, CNNConfig
from planner.models.gpt import GPT, GPTConfig
from planner.models.mlp import MLP, MLPConfig
from planner.models.presets import PRESETS, Preset

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "parse_set"]

_DEFAULT_SEQ = 2048


class ModelLoadError(ValueError):
    """The MODEL argument cannot be turned into a model; the message says what to change."""


@dataclass
class LoadedModel:
    """A model ready to trace: the module, example inputs, a display name and its arch."""

    model: nn.Module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    name: str = "model"
    arch: ModelArch | None = None


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """Parse ``["k=v", ...]``; values are JSON when they parse (ints, floats, bools, lists)."""
    import json

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ModelLoadError(
                f"--set {item!r} is not KEY=VALUE; write e.g. --set num_hidden_layers=2 "
                "(one --set per key)"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def load_model(
    spec: str,
    overrides: dict[str, Any] | None = None,
    *,
    batch_size: int = 1,
    seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Build the model named by ``spec`` with example inputs of ``batch_size`` x ``seq_len``.

    Args:
        spec: preset name, ``hf:<model_type>``, ``file.py:factory`` or ``module:factory``.
        overrides: config fields to change (presets and ``hf:`` only).
        batch_size: batch dimension of the example inputs.
        seq_len: sequence length of the example inputs (default: min(2048, max positions)).
        dtype: parameter dtype.
        device: ``"cpu"`` or ``"meta"`` (no weights allocated; for planning big models).
        seed: RNG seed for the random weights and inputs.

    Raises:
        ModelLoadError: unknown preset/model_type (with close matches), a bad override, a
            factory that cannot be imported or raises.
    """
    overrides = dict(overrides or {})
    torch.manual_seed(seed)
    if spec in PRESETS:
        return _from_preset(PRESETS[spec], overrides, batch_size, seq_len, dtype, device)
    if spec.startswith("hf:"):
        model_type = spec[3:]
        preset = Preset(spec, "hf", {"model_type": model_type})
        return _from_preset(preset, overrides, batch_size, seq_len, dtype, device)
    if ":" in spec:
        if overrides:
            raise ModelLoadError(f"--set applies to presets and hf: models, not to factory {spec!r}")
        return _from_factory(spec)
    close = difflib.get_close_matches(spec, list(PRESETS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelLoadError(
        f"unknown model {spec!r}.{hint} Give a preset ({', '.join(PRESETS)}), "
        "hf:<model_type> (e.g. hf:llama --set num_hidden_layers=2), or a factory "
        "(path/to/file.py:make_model or package.module:make_model)."
    )


def _from_preset(preset, overrides, batch_size, seq_len, dtype, device) -> LoadedModel:
    if preset.kind == "hf":
        return _build_hf(preset, overrides, batch_size, seq_len, dtype, device)
    cls, cfg_cls = {"gpt": (GPT, GPTConfig), "mlp": (MLP, MLPConfig), "cnn": (CNN, CNNConfig)}[preset.kind]
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    _check_keys(preset.name, overrides, fields)
    try:
        cfg = cfg_cls(**{**preset.config, **overrides})
        with torch.device(device):
            model = cls(cfg).to(dtype).eval()
    except (TypeError, ValueError, AssertionError) as e:
        raise ModelLoadError(f"cannot build {preset.name} with {overrides or 'its defaults'}: {e}") from None
    if preset.kind == "gpt":
        seq = _seq(preset.name, seq_len, cfg.block_size)
        args = (torch.randint(0, cfg.vocab_size, (batch_size, seq), device=device),)
        arch = cfg.to_arch()
    elif preset.kind == "mlp":
        args = (torch.randn(batch_size, cfg.in_features, device=device, dtype=dtype),)
        arch = ModelArch("mlp", cfg.hidden, cfg.num_blocks, ffn_hidden_size=cfg.expansion * cfg.hidden)
    else:
        args = (torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size,
                            device=device, dtype=dtype),)
        arch = ModelArch("cnn", cfg.channels[-1], len(cfg.channels))
    return LoadedModel(model, args, {}, preset.name, arch)


def _check_keys(name: str, overrides: dict, allowed: set[str]) -> None:
    for key in overrides:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelLoadError(
                f"--set {key}: {name} has no config field {key!r}.{hint} "
                f"Fields: {', '.join(sorted(k for k in allowed if not k.startswith('_')))}"
            )


def _seq(name: str, seq_len: int | None, max_positions: int | None) -> int:
    if seq_len is None:
        return min(_DEFAULT_SEQ, max_positions or _DEFAULT_SEQ)
    if max_positions is not None and seq_len > max_positions:
        raise ModelLoadError(
            f"{name} has learned position embeddings for {max_positions} tokens; "
            f"--seq {seq_len} is too long (use --seq {max_positions} or less)"
        )
    return seq_len


def _build_hf(preset, overrides, batch_size, seq_len, dtype, device) -> LoadedModel:
    try:
        import transformers
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        raise ModelLoadError(
            f"{preset.name} needs transformers: pip install 'fx-planner[hf]'"
        ) from None
    config_kwargs = dict(preset.config)
    model_type = config_kwargs.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(
            f"transformers has no model_type {model_type!r}.{hint} "
            "Any key of transformers' CONFIG_MAPPING works, e.g. hf:llama, hf:gpt2, hf:mistral."
        )
    default = CONFIG_MAPPING[model_type]()
    _check_keys(preset.name, overrides, set(default.to_dict()) | set(vars(default)))
    try:
        config = AutoConfig.for_model(model_type, **{**config_kwargs, **overrides})
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"cannot build the {model_type} config with {overrides}: {e}") from None
    auto_classes = (transformers.AutoModelForCausalLM, transformers.AutoModel)
    model = None
    for auto in auto_classes:
        try:
            with torch.device(device):
                model = auto.from_config(config, dtype=dtype)
            break
        except ValueError:
            continue
        except Exception as e:  # a config the model class rejects (heads not dividing, ...)
            raise ModelLoadError(f"transformers could not build {preset.name} ({model_type}): {e}") from None
    if model is None:
        raise ModelLoadError(f"transformers has no causal-LM or base model class for {model_type!r}")
    model.eval()
    max_pos = getattr(config, "n_positions", None) if model_type == "gpt2" else None
    seq = _seq(preset.name, seq_len, max_pos)
    if seq_len is None and getattr(config, "max_position_embeddings", None):
        seq = min(seq, config.max_position_embeddings)
    vocab = getattr(config, "vocab_size", 2) or 2
    kwargs: dict[str, Any] = {"input_ids": torch.randint(0, vocab, (batch_size, seq), device=device)}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return LoadedModel(model, (), kwargs, preset.name, ModelArch.from_hf_config(config))


def _from_factory(spec: str) -> LoadedModel:
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ModelLoadError(f"factory file {target} does not exist")
            module_name = f"_fx_planner_factory_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot import {target} for factory {spec!r}: {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"{target} has no callable {attr!r}.{hint}")
    try:
        made = factory()
    except Exception as e:
        raise ModelLoadError(
            f"factory {spec} raised {type(e).__name__}: {e}. Fix the factory so that calling it "
            "with no arguments returns a model (and optionally its example inputs)."
        ) from None
    model, args, kwargs = _unpack_factory_result(spec, made)
    return LoadedModel(model.eval(), args, kwargs, name=attr, arch=_arch_of(model))


def _unpack_factory_result(spec: str, made: Any) -> tuple[nn.Module, tuple, dict]:
    if isinstance(made, dict):
        made = (made.get("model"), made.get("args", ()), made.get("kwargs", {}))
    if isinstance(made, nn.Module):
        made = (made,)
    if not isinstance(made, tuple) or not made or not isinstance(made[0], nn.Module):
        raise ModelLoadError(
            f"factory {spec} returned {type(made).__name__}; return an nn.Module, "
            "(model, args), (model, args, kwargs) or {'model':..., 'args':..., 'kwargs':...}"
        )
    model = made[0]
    args = made[1] if len(made) > 1 else ()
    kwargs = made[2] if len(made) > 2 else {}
    if not isinstance(args, tuple):
        args = (args,)
    if not args and not kwargs:
        raise ModelLoadError(
            f"factory {spec} returned a model without example inputs; return (model, (example_input,)) "
            "so the model can be traced"
        )
    return model, args, kwargs


def _arch_of(model: nn.Module) -> ModelArch | None:
    try:
        return ModelArch.of_module(model)
    except Exception:  # a user factory's config that from_hf_config cannot read
        return None
