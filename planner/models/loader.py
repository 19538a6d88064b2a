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
import json
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
from planner.units import fmt_value as _show

__all__ = ["LoadedModel", "ModelLoadError", "check_positions", "load_model", "parse_set"]

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
    context_len: int | None = None,
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
        context_len: KV-cache length a decode workload will use; refused, like ``seq_len``,
            when it exceeds the model's position limit.

    Raises:
        ModelLoadError: unknown preset/model_type (with close matches), a bad override (wrong
            type, not positive, rejected by the config class), a sequence or context beyond
            the model's positions, a factory that cannot be imported, raises or exits.
    """
    overrides = dict(overrides or {})
    torch.manual_seed(seed)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"MODEL must be a preset name, hf:<model_type> or file.py:factory, "
                             f"got {spec!r}")
    positions = (seq_len, context_len)
    if spec in PRESETS:
        return _from_preset(PRESETS[spec], overrides, batch_size, positions, dtype, device)
    if spec.startswith("hf:"):
        model_type = spec[3:]
        preset = Preset(spec, "hf", {"model_type": model_type})
        return _from_preset(preset, overrides, batch_size, positions, dtype, device)
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


def _from_preset(preset, overrides, batch_size, positions, dtype, device) -> LoadedModel:
    if preset.kind == "hf":
        return _build_hf(preset, overrides, batch_size, positions, dtype, device)
    cls, cfg_cls = {"gpt": (GPT, GPTConfig), "mlp": (MLP, MLPConfig), "cnn": (CNN, CNNConfig)}[preset.kind]
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    _check_keys(preset.name, overrides, fields)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg_cls)
                if f.default is not dataclasses.MISSING}
    _check_values(preset.name, overrides, {**defaults, **preset.config})
    config = {**preset.config, **overrides}
    if preset.kind == "gpt":
        seq = check_positions(preset.name, positions, {**defaults, **config}.get("block_size"),
                              "block_size")
    try:
        cfg = cfg_cls(**config)
        with torch.device(device):
            model = cls(cfg).to(dtype).eval()
    except Exception as e:  # the config's own checks (heads dividing the width, ...)
        raise ModelLoadError(f"cannot build {preset.name} with {_describe(overrides)}: "
                             f"{_one_line(e)}") from None
    if preset.kind == "gpt":
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


# Config fields that count something (layers, heads, widths, positions, experts): a value
# below 1 builds a model that is not the one asked for (0 layers plans as 1), so it is
# refused. An explicit list: a suffix rule also caught fields where 0 means something
# (qwen2's max_window_layers).
_COUNT_KEYS = frozenset({
    "num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_blocks",
    "num_attention_heads", "num_heads", "n_head", "num_key_value_heads", "head_dim",
    "hidden_size", "n_embd", "d_model", "hidden", "intermediate_size", "ffn_dim", "n_inner",
    "expansion", "vocab_size", "max_position_embeddings", "n_positions", "n_ctx",
    "block_size", "num_local_experts", "num_experts", "num_experts_per_tok",
})


def _check_values(name: str, overrides: dict, defaults: dict) -> None:
    """Each ``--set`` value has the type of the field's default, and sizes are >= 1."""
    for key, value in overrides.items():
        default = defaults.get(key)
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif value is None and key not in _COUNT_KEYS:
            # null is how a config says "off" or "derive it" (mistral's sliding_window,
            # bos_token_id); transformers' own validation, wrapped below, judges the rest
            ok, want = True, ""
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            want = "a number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        elif default is None and key in _COUNT_KEYS:
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
            want = "a whole number"
        else:
            ok, want = True, ""
        if not ok:
            raise ModelLoadError(
                f"--set {key}={_show(value)}: {name}'s {key} must be {want} (its default is "
                f"{_show(default)}); write e.g. --set {key}={_show(default)}"
            )
        if (key in _COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool)
                and value < 1 and (default is None or (isinstance(default, int) and default >= 1))):
            raise ModelLoadError(
                f"--set {key}={value}: {key} counts something in the model and must be >= 1 "
                f"(default {_show(default)})"
            )


def _describe(overrides: dict) -> str:
    if not overrides:
        return "its defaults"
    return " ".join(f"--set {k}={_show(v)}" for k, v in overrides.items())


def _one_line(e: BaseException) -> str:
    """An exception's message on one line; a wrapped cause (transformers' strict dataclass
    validation wraps the real ValueError) is shown instead of the wrapper."""
    cause = e.__cause__ if e.__cause__ is not None and type(e).__module__.startswith(
        "huggingface_hub") else None
    text = str(cause if cause is not None else e) or type(e).__name__
    return " ".join(text.split())


def check_positions(name: str, positions: tuple[int | None, int | None], limit: int | None,
                    key: str) -> int:
    """The example sequence length for ``name``: ``seq_len``, or min(2048, limit) if it is
    None. A sequence (``--seq``) or KV context (``--context``) longer than the model's
    position limit (learned position embeddings or RoPE's ``max_position_embeddings``) is
    refused, naming the limit and the ``--set`` that raises it.
    """
    seq_len, context_len = positions
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        limit = None
    for value, flag in ((seq_len, "--seq"), (context_len, "--context")):
        if value is not None and limit is not None and value > limit:
            raise ModelLoadError(
                f"{name} has {limit} positions ({key}); {flag} {value} is too long. Use "
                f"{flag} {limit} or less, or raise the limit with --set {key}={value}"
            )
    if seq_len is None:
        return min(_DEFAULT_SEQ, limit or _DEFAULT_SEQ)
    return seq_len


def _build_hf(preset, overrides, batch_size, positions, dtype, device) -> LoadedModel:
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
    try:
        default = CONFIG_MAPPING[model_type]()
    except Exception as e:
        raise ModelLoadError(f"transformers cannot build a default {model_type} config: "
                             f"{_one_line(e)}") from None
    _check_keys(preset.name, overrides, set(default.to_dict()) | set(vars(default)))
    _check_values(preset.name, overrides, {**default.to_dict(), **config_kwargs})
    try:
        config = AutoConfig.for_model(model_type, **{**config_kwargs, **overrides})
    except Exception as e:  # transformers' own validation (strict dataclasses, ValueError)
        raise ModelLoadError(
            f"transformers refuses the {preset.name} config with {_describe(overrides)}: "
            f"{_one_line(e)}"
        ) from None
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads >= 1 and heads % kv_heads:
        raise ModelLoadError(
            f"{preset.name}: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}; change one with --set so that it is"
        )
    key = "n_positions" if "n_positions" in config.to_dict() else "max_position_embeddings"
    seq = check_positions(preset.name, positions, getattr(config, key, None), key)
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
            raise ModelLoadError(f"transformers could not build {preset.name} ({model_type}) "
                                 f"with {_describe(overrides)}: {_one_line(e)}") from None
    if model is None:
        raise ModelLoadError(f"transformers has no causal-LM or base model class for {model_type!r}")
    model.eval()
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
    except SystemExit as e:
        raise ModelLoadError(
            f"importing {target} for factory {spec!r} called sys.exit({e.code!r}); a factory "
            "module must not exit when imported (guard scripts with `if __name__ == "
            "\"__main__\":`)"
        ) from None
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
    except SystemExit as e:
        raise ModelLoadError(
            f"factory {spec} called sys.exit({e.code!r}) instead of returning a model. Fix the "
            "factory so that calling it with no arguments returns a model (and optionally its "
            "example inputs), or raises an exception that says what is wrong."
        ) from None
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
