"""`--set` config overrides: wrong types, sizes below 1, and what transformers' own config
validation refuses all end in one `error:` paragraph that names the field."""

from __future__ import annotations

import pytest

from tests.bad_input.cli_helpers import HF_LLAMA, call, refused


@pytest.mark.parametrize("override, expected", [
    ("num_hidden_layers={bad", 'num_hidden_layers="{bad": hf:llama\'s num_hidden_layers must be a whole number'),
    ('num_hidden_layers="two"', "num_hidden_layers must be a whole number"),
    ("num_hidden_layers=2.5", "num_hidden_layers must be a whole number"),
    ("num_hidden_layers=-1", "--set num_hidden_layers=-1: num_hidden_layers counts something in the model and must be >= 1"),
    ("num_hidden_layers=0", "--set num_hidden_layers=0"),
    ("hidden_size=65", "The hidden size (65) is not a multiple of the number of attention heads (4)"),
    ("num_attention_heads=3", "not a multiple of the number of attention heads (3)"),
    ("num_key_value_heads=3", "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("num_key_value_heads=0", "--set num_key_value_heads=0"),
    ("vocab_size=0", "--set vocab_size=0"),
    ("max_position_embeddings=0", "--set max_position_embeddings=0"),
    ("rms_norm_eps=tiny", "rms_norm_eps must be a number"),
    ("tie_word_embeddings=3", "tie_word_embeddings must be true or false"),
    ("hidden_act=3", "hidden_act must be a string"),
    ("num_hiden_layers=2", "Did you mean num_hidden_layers"),
    ("num_hidden_layers", "is not KEY=VALUE"),
    ("=5", "is not KEY=VALUE"),
])
def test_bad_hf_override(capsys, override, expected):
    refused([*HF_LLAMA, "--set", override, "--seq", "16", "--layers-only"], capsys, expected)


@pytest.mark.parametrize("argv, expected", [
    (["gpt-tiny", "--set", "n_layer=0"], "--set n_layer=0: n_layer counts something"),
    (["gpt-tiny", "--set", "n_head=3"], "cannot build gpt-tiny with --set n_head=3"),
    (["gpt-tiny", "--set", "block_size=-1"], "--set block_size=-1"),
    (["mlp", "--set", "hidden=x"], "mlp's hidden must be a whole number"),
    (["mlp", "--set", "num_blocks=-2"], "--set num_blocks=-2"),
    (["llama-tiny", "--set", "num_hidden_layers=-1"], "--set num_hidden_layers=-1"),
    (["planner.models.gpt:GPT", "--set", "n_layer=2"], "--set applies to presets and hf: models"),
])
def test_bad_preset_override(capsys, argv, expected):
    refused([*argv, "--layers-only"], capsys, expected)


def test_a_good_override_still_plans_the_model_asked_for(capsys):
    import json

    code, out, err = call([*HF_LLAMA, "--set", "num_hidden_layers=3", "--seq", "16",
                           "--layers-only", "--json"], capsys)
    assert code == 0, err
    layers = json.loads(out)["model"]["layers"]
    assert [layer["kind"] for layer in layers] == ["pre", "block", "block", "block", "post"]


@pytest.mark.parametrize("model, override", [
    ("hf:mistral", "sliding_window=null"),  # null: full attention, a documented value
    ("hf:qwen2", "max_window_layers=0"),  # 0 means something here; it counts nothing
])
def test_meaningful_null_and_zero_values_are_accepted(capsys, model, override):
    code, _, err = call([model, "--set", "num_hidden_layers=2", "--set", "hidden_size=64",
                         "--set", "intermediate_size=128", "--set", "num_attention_heads=4",
                         "--set", "num_key_value_heads=2", "--set", "vocab_size=128",
                         "--set", override, "--seq", "16", "--layers-only"], capsys)
    assert code == 0, err
