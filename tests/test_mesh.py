import jax
import pytest

import jaxtp


@pytest.mark.parametrize(
    "spec,shape",
    [
        ("2x4", {"data": 2, "model": 4}),
        ("1x1", {"data": 1, "model": 1}),
        ("data=2,model=4", {"data": 2, "model": 4}),
        ("model=8", {"data": 1, "model": 8}),
        ("2x2x2", {"data": 2, "fsdp": 2, "model": 2}),
    ],
)
def test_make_mesh_shapes(spec, shape):
    mesh = jaxtp.make_mesh(spec)
    assert dict(mesh.shape) == shape
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert list(mesh.devices.flat) == jax.devices()[: mesh.devices.size]  # the first devices


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("3x3", "needs 9 devices but 8"),
        ("16x1", "needs 16 devices"),
        ("0x8", "size 0"),
        ("-1x8", "size -1"),
        ("2.5x4", "malformed"),
        ("abc", "malformed"),
        ("", "empty"),
        ("2x4x1x1", "4 axes"),
        ("data=2,tensor=4", "unknown axis 'tensor'"),
    ],
)
def test_bad_mesh_specs(spec, fragment):
    with pytest.raises(ValueError) as e:
        jaxtp.make_mesh(spec)
    assert fragment in str(e.value)
    assert repr(spec) in str(e.value) or spec == ""


def test_use_cpu_devices_too_late_says_how_to_fix():
    jax.devices()  # backends are up with 8 devices
    jaxtp.use_cpu_devices(8)  # same count: fine
    with pytest.raises(RuntimeError, match="before any JAX array is created"):
        jaxtp.use_cpu_devices(4)
