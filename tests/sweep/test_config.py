"""A sweep config is checked whole when it is loaded (issue 30): every field against its
type (a quoted number is refused, not failed later as an error row), a value listed twice in a
list field (it would evaluate a cell twice), a key given twice in the YAML, unknown names, bad
values and impossible executor resources — each one line naming the value."""
from __future__ import annotations

import pytest
from test_reruns import SMALL

from longctx.core.errors import LongctxError


@pytest.mark.parametrize("change, message", [
    ({"ssm_carry": "sometimes"}, "unknown ssm_carry 'sometimes'; valid choices: chunk, reset"),
    ({"haystack": "hay"}, "unknown haystack 'hay'; valid choices: noise, essay"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"truncation": "cut"}, "unknown truncation 'cut'; valid choices: refuse, left, middle"),
    ({"depths": [1.5]}, "depth 1.5 is not a number in [0, 1]"),
    ({"cell_timeout_s": 0}, "cell_timeout_s must be a positive number, got 0"),
    ({"train_timeout_s": "1h"}, "train_timeout_s in config must be a number or null, got '1h'"),
    ({"learning_rate": -1}, "learning_rate must be a positive number"),
    ({"recipe_overrides": {"ssmlora": {"rank": 4}}},
     "unknown method in recipe_overrides 'ssmlora'; valid choices: base, lora"),
    ({"recipe_overrides": {"lora": {"colour": 1}}}, "unknown recipe field 'colour' for method 'lora'"),
    ({"recipe_overrides": {"lora": {"rank": 0}}}, "rank must be a positive integer, got 0"),
    ({"recipe_overrides": ["lora"]}, "recipe_overrides in config must be a mapping to mappings, got ['lora']"),
    # a value listed twice would evaluate a cell twice (two rows, one cell)
    ({"methods": ["base", "lora", "base"]}, "methods in config lists 'base' twice; give each value once"),
    ({"lengths": [256, 320, 256]}, "lengths in config lists 256 twice"),
    ({"tasks": ["passkey", "passkey"]}, "tasks in config lists 'passkey' twice"),
    ({"seeds": [0, 1, 0]}, "seeds in config lists 0 twice"),
    ({"unchunked_methods": ["base", "base"]}, "unchunked_methods in config lists 'base' twice"),
    ({"depths": [0.5, 0.5]}, "depths in config lists 0.5 twice"),
    ({"train_chunk_size": {"lora": [64, None, 64]}}, "train_chunk_size['lora'] in config lists 64 twice"),
    ({"train_chunk_size": [None, None]}, "train_chunk_size in config lists None twice"),
    # quoted numbers (and other wrong types) are refused on load, not failed later as error rows
    ({"train_steps": "4"}, "train_steps in config must be an integer, got '4' ('4' is a string: write the number "
                           "without quotes)"),
    ({"seeds": ["0"]}, "seeds in config must be a list of integers, got ['0']"),
    ({"train_chunk_size": {"lora": "64"}}, "train_chunk_size in config must be an integer, null, a list of "
                                           "(integers or null) or a mapping to (integers, null or lists of "
                                           "(integers or null)), got {'lora': '64'}"),
    ({"learning_rate": "1e-4"}, "learning_rate in config must be a number or null, got '1e-4' (YAML reads 1e-4 as "
                                "a string: write 1.0e-4)"),
    ({"chunk_size": 64.0}, "chunk_size in config must be an integer or null, got 64.0"),
    ({"num_samples": True}, "num_samples in config must be an integer, got True"),
    ({"depths": ["0.5"]}, "depths in config must be a list of numbers or null, got ['0.5']"),
    ({"recipe_overrides": {"lora": {"alpha": "8"}}}, "recipe_overrides.lora.alpha must be a number, got '8'"),
    ({"executor": {"cpus_per_cell": "2"}}, "executor.cpus_per_cell must be an integer, got '2'"),
    ({"executor": {"kind": "ray", "ray_num_cpus": 0}},
     "executor.ray_num_cpus=0 leaves no room for a cell group of executor.cpus_per_cell=1"),
])
def test_bad_new_config_values_are_one_line_errors(change, message):
    from longctx.sweep.run import parse_config

    with pytest.raises(LongctxError) as err:
        parse_config({**SMALL, **change})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_config_field_refuses_a_value_of_another_type():
    """Each field of SweepConfig is checked against its annotation on load: a quoted number where a
    number belongs, a number where a name belongs."""
    from longctx.core.typecheck import conforms, field_types
    from longctx.sweep.run import SweepConfig, parse_config

    for key, hint in field_types(SweepConfig).items():
        bad = 1 if conforms("1", hint) else "1"
        with pytest.raises(LongctxError) as err:
            parse_config({**SMALL, key: bad})
        assert str(err.value).startswith(f"{key} in config must be ") and f"got {bad!r}" in str(err.value), key


def test_a_key_given_twice_in_the_yaml_is_refused(tmp_path):
    from longctx.sweep.run import load_config

    (tmp_path / "twice.yaml").write_text("methods: [base]\ntasks: [passkey]\nlengths: [256]\nlengths: [512]\n")
    with pytest.raises(LongctxError, match=r"twice.yaml': the key 'lengths' is given twice \(line 4\)"):
        load_config(tmp_path / "twice.yaml")
