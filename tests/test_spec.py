"""The quant spec's validation of the optional per-layer "output" quantizer and check_bits."""

import copy

import pytest

from edgekit.calibration.spec import MAX_BITS, MIN_BITS, check_bits, new_spec, validate_spec
from edgekit.errors import EdgekitError


def spec_with_output(output) -> dict:
    spec = new_spec("tiny", "ptq")
    spec["layers"]["conv1"] = {"type": "Conv2d",
                               "weight": {"bits": 8, "signed": True, "axis": 0, "scale": [0.01, 0.02],
                                          "zero_point": [0, 0]},
                               "input": {"bits": 8, "signed": True, "scale": 0.02, "zero_point": 0,
                                         "observer": "minmax"},
                               "output": output}
    return spec


GOOD_OUTPUT = {"bits": 8, "signed": False, "scale": 0.05, "zero_point": 0, "observer": "percentile"}


@pytest.mark.parametrize("output", [GOOD_OUTPUT, None, {**GOOD_OUTPUT, "bits": 4, "zero_point": 15}])
def test_a_valid_or_absent_output_entry_passes(output):
    spec = spec_with_output(output)
    assert validate_spec(spec) is spec
    del spec["layers"]["conv1"]["output"]
    assert validate_spec(spec) is spec


@pytest.mark.parametrize("change, message", [
    ({"bits": 9}, "output: bits"),
    ({"bits": True}, "output: bits"),
    ({"signed": "no"}, "output: signed"),
    ({"scale": 0.0}, "output: scale"),
    ({"scale": float("nan")}, "output: scale"),
    ({"zero_point": -1}, r"output: zero_point must be an integer in \[0, 255\]"),
    ({"zero_point": 1.5}, "output: zero_point"),
    ({"observer": "kl"}, "output: observer"),
])
def test_a_broken_output_entry_names_the_layer_and_field(change, message):
    spec = spec_with_output({**copy.deepcopy(GOOD_OUTPUT), **change})
    with pytest.raises(EdgekitError, match=message) as info:
        validate_spec(spec)
    assert "'conv1'" in str(info.value) and "\n" not in str(info.value)


def test_an_output_that_is_not_an_object_is_rejected():
    with pytest.raises(EdgekitError, match="'conv1' output: expected an object or null"):
        validate_spec(spec_with_output([1, 2]))


@pytest.mark.parametrize("value", [MIN_BITS - 1, MAX_BITS + 1, 4.0, "8", True, None])
def test_check_bits_rejects_what_is_not_an_int_in_range(value):
    with pytest.raises(EdgekitError, match=rf"--x: bits must be an integer in \[{MIN_BITS}, {MAX_BITS}\]"):
        check_bits(value, "--x")


def test_check_bits_accepts_the_whole_range():
    assert [check_bits(b, "b") for b in range(MIN_BITS, MAX_BITS + 1)] == list(range(MIN_BITS, MAX_BITS + 1))
