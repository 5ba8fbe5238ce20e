import numpy as np
import pytest

from deepship.errors import InputSpecError
from deepship.models.spec import TensorSpec, check_inputs, parse_input_spec


def test_parse_input_spec_named_dims_are_dynamic():
    t = parse_input_spec("x:float32[batch,3,32,32]")
    assert t.name == "x" and t.dtype == "float32"
    assert t.dims == ("batch", 3, 32, 32)
    assert t.dynamic_dims == {0: "batch"}
    assert t.shape({"batch": 5}) == (5, 3, 32, 32)


@pytest.mark.parametrize("bad", ["x", "x:float32", "x:float99[1]", "x:float32[1,-2]", "1x:float32[1]"])
def test_parse_input_spec_rejects_bad_text(bad):
    with pytest.raises(InputSpecError):
        parse_input_spec(bad)


def test_check_inputs_names_shape_dtype():
    specs = [TensorSpec("x", ("batch", 4), "float32")]
    check_inputs(specs, {"x": np.zeros((7, 4), np.float32)})
    with pytest.raises(InputSpecError, match="missing input 'x'"):
        check_inputs(specs, {})
    with pytest.raises(InputSpecError, match="unexpected input 'y'"):
        check_inputs(specs, {"x": np.zeros((1, 4), np.float32), "y": np.zeros(1)})
    with pytest.raises(InputSpecError, match="axis 1"):
        check_inputs(specs, {"x": np.zeros((1, 5), np.float32)})
    with pytest.raises(InputSpecError, match="dtype"):
        check_inputs(specs, {"x": np.zeros((1, 4), np.float64)})


def test_random_inputs_are_seeded():
    t = TensorSpec("ids", ("batch", "seq"), "int64", 0, 100)
    a, b = t.random(seed=3), t.random(seed=3)
    assert a.dtype == np.int64 and np.array_equal(a, b) and a.max() < 100
