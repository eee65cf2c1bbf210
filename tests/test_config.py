from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from digits_jax import config


@pytest.mark.parametrize("changes,message", [
    ({"batch_size": 0}, r"config.batch_size = 0: must be an integer >= 1"),
    ({"epochs": -1}, r"config.epochs = -1"),
    ({"learning_rate": -0.1}, r"config.learning_rate = -0.1: must be > 0"),
    ({"learning_rate": 0.0}, r"config.learning_rate = 0.0: must be > 0"),
    ({"model": "resnet"},
     r"config.model = 'resnet': choose one of \['bn', 'fast', 's2d', 's2d16', 'seed', 'strided'\]"),
    ({"optimizer": "lion"}, r"config.optimizer = 'lion'"),
    ({"schedule": "step"}, r"config.schedule = 'step'"),
    ({"train_limit": 0}, r"config.train_limit = 0"),
    ({"weight_decay": -1.0}, r"config.weight_decay = -1.0"),
    ({"weight_decay": float("nan"), "optimizer": "adamw"}, r"config.weight_decay = nan: must be a finite number"),
    ({"learning_rate": float("inf")}, r"config.learning_rate = inf: must be a finite number"),
    ({"learning_rate": "1e-3"}, r"config.learning_rate = '1e-3': must be float"),
    ({"train_limit": 300.5}, r"config.train_limit = 300.5: must be int or None"),
    ({"batch_size": True}, r"config.batch_size = True: must be int"),
    ({"batch_size": np.bool_(True)}, r"config.batch_size = True: must be int"),
    ({"epochs": np.float64(3.0)}, r"config.epochs = 3.0: must be int"),
    ({"model": ["seed"]}, r"config.model = \['seed'\]: must be str"),
    ({"shard_params": 1}, r"config.shard_params = 1: must be bool"),
    ({"decay_rate": 0.5}, r"config.decay_rate = 0.5 has no effect with schedule='onecycle': it applies to 'exp"),
    ({"clean_epochs": 2}, r"config.clean_epochs = 2 has no effect with augment='none'"),
    ({"weight_decay": 1e-4}, r"config.weight_decay = 0.0001 has no effect with optimizer='adam': set optimizer=adamw"),
    ({"warmup_epochs": 1.0}, r"config.warmup_epochs = 1.0 has no effect with schedule='onecycle'"),
    ({"seed": 2**32}, r"config.seed = 4294967296: must be an integer in \[0, 2\*\*32\)"),
    ({"seed": -1}, r"config.seed = -1"),
    ({"label_smoothing": 1.0}, r"config.label_smoothing = 1.0: must be in \[0, 1\)"),
    ({"ema_decay": -0.1}, r"config.ema_decay = -0.1"),
    ({"warmup_epochs": 6.0}, r"config.warmup_epochs = 6.0: must be >= 0 and below epochs \(6\)"),
    ({"decay_rate": 0.0}, r"config.decay_rate = 0.0"),
    ({"clean_epochs": 6}, r"config.clean_epochs = 6: must be below epochs \(6\); for no augmentation at all set"),
    ({"clean_epochs": -1}, r"config.clean_epochs = -1: must be an integer >= 0"),
    ({"dataset": "MNIST"}, r"config.dataset = 'MNIST': write 'mnist' \(the name that checks MNIST's files\)"),
    ({"dataset": ""}, r"config.dataset is empty: give a value, or leave it out for the default"),
    ({"data_dir": ""}, r"config.data_dir is empty"),
])
def test_impossible_values_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        config.default().replace(**changes)


def test_presets_are_valid_and_seed_is_the_keras_recipe():
    for name in config.PRESETS:
        assert config.get(name).name == name
    seed = config.seed()
    assert (seed.model, seed.optimizer, seed.learning_rate, seed.schedule, seed.batch_size, seed.epochs) == \
        ("seed", "adam", 1e-4, "constant", 128, 10)
    assert (seed.augment, seed.label_smoothing, seed.ema_decay, seed.tta_shift) == ("none", 0.0, 0.0, 0)


def test_overrides_parse_by_field_type():
    c = config.default().with_overrides(["epochs=3", "learning_rate=0.01", "train_limit=100", "data_dir=/x"])
    assert (c.epochs, c.learning_rate, c.train_limit, c.data_dir) == (3, 0.01, 100, "/x")
    assert c.with_overrides(["train_limit=none"]).train_limit is None


@pytest.mark.parametrize("assignment,message", [
    ("epochs", "expected KEY=VALUE"),
    ("color=red", "expected KEY=VALUE"),
    ("epochs=three", "cannot parse 'three' as int"),
])
def test_bad_overrides(assignment, message):
    with pytest.raises(ValueError, match=message):
        config.default().with_overrides([assignment])
    # One string, not a list, was read one letter at a time: "--set 'e': expected KEY=VALUE".
    with pytest.raises(TypeError, match=r"with_overrides\('epochs=3'\): give a list of 'key=value' strings"):
        config.default().with_overrides("epochs=3")


def test_json_round_trip_and_unknown_keys():
    c = config.tiny()
    assert config.Config.from_dict(dataclasses.asdict(c)) == c
    with pytest.raises(ValueError, match=r"unknown config keys \['colour'\]"):
        config.Config.from_dict({"colour": 1})


def test_numpy_scalars_become_python_numbers():
    # A sweep over np.arange/np.logspace hands the config NumPy scalars; they must be judged by value and saved.
    c = config.tiny().replace(epochs=np.int64(3), learning_rate=np.float32(0.5), shard_params=np.bool_(True),
                              model=np.str_("bn"))
    assert (c.epochs, c.learning_rate, c.shard_params, c.model) == (3, 0.5, True, "bn")
    assert [type(v) for v in (c.epochs, c.learning_rate, c.shard_params, c.model)] == [int, float, bool, str]
    assert json.loads(c.to_json())["epochs"] == 3
    assert c == config.tiny().replace(epochs=3, learning_rate=0.5, shard_params=True, model="bn")
    # A float32 keeps the decimal it was written as (a resume with 0.1 was refused as a changed field), JAX scalars
    # and 0-d arrays are numbers too.
    for rate in (np.float32(0.1), jnp.float32(0.1), np.array(0.1), jnp.asarray(0.1)):
        assert config.tiny().replace(learning_rate=rate).learning_rate == 0.1, rate
    assert config.tiny().replace(epochs=jnp.int32(4)).epochs == 4
    with np.printoptions(legacy="1.13"):  # str() would give 0.123457, another float32
        assert config.tiny().replace(learning_rate=np.float32(0.123456789)).learning_rate == 0.12345679


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        config.get("huge")


def test_changed_fields_names_what_differs_except_placement():
    base = config.default()
    assert base.changed_fields(base.replace(num_devices=2, shard_params=True, data_dir="/elsewhere")) == []
    assert base.changed_fields(base.replace(learning_rate=0.5, seed=3, num_devices=2)) == ["learning_rate", "seed"]
