"""Meshes as shapes: what the rules table and the abstract model read from a Mesh, with no devices behind it."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..mesh import parse_mesh_spec
from ..sharding import split_size

__all__ = ["MeshShape", "mesh_shape"]


class MeshShape:
    """What resolve_rules / Layout / abstract_model read from a Mesh (`.shape`, `.devices.size`), for
    meshes larger than this machine: planning never touches devices."""

    def __init__(self, axes: Mapping[str, int]):
        self.shape = dict(axes)
        self.axis_names = tuple(axes)
        self.devices = np.empty(tuple(axes.values()), np.int8)  # only .size / .shape are read

    def __repr__(self):
        return "MeshShape(" + ", ".join(f"{k}={v}" for k, v in self.shape.items()) + ")"

    def split(self, axes) -> int:
        """Devices along `axes` (a rules target: a mesh axis, a tuple of them, or None)."""
        return split_size(axes, self)


def mesh_shape(mesh) -> MeshShape:
    """A MeshShape of a spec ("8x8", "data=2,model=4"), an {axis: size} dict, a jax Mesh or a MeshShape."""
    if isinstance(mesh, str):
        return MeshShape(parse_mesh_spec(mesh))
    if isinstance(mesh, Mapping):
        return MeshShape(mesh)
    return MeshShape(dict(mesh.shape))
