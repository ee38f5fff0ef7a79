"""jaxtp.plot_layout: the picture's data is the arrays' real placement, and the PNG has its promised size."""

import math

import matplotlib.image
import numpy as np
import pytest
from flax import nnx

import jaxtp
from jaxtp.build import abstract_sharded
from jaxtp.layout_plot import bounds_of, figure_size, layout_cells, plot_layout
from jaxtp.sharding import Layout

pytestmark = pytest.mark.timeout(120)

# (mesh, rules): Megatron TP; FSDP composed with TP on a 3-axis mesh; 4 kv heads < model axis 8 (replicated).
CASES = {
    "megatron-2x4": ("2x4", "megatron"),
    "fsdp-2x2x2": ("2x2x2", "fsdp"),
    "kv-replicated-1x8": ("1x8", "megatron"),
}


@pytest.fixture(scope="module")
def models(tiny):
    return {
        name: jaxtp.Transformer.create(tiny, jaxtp.make_mesh(spec), rules=rules)
        for name, (spec, rules) in CASES.items()
    }


def arrays(model) -> dict:
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("case", CASES)
def test_cells_are_the_real_placement(models, case):
    """What the picture draws for each device is what array.addressable_shards holds, for every parameter."""
    model = models[case]
    kinds, real = layout_cells(model), arrays(model)
    assert sorted(p for k in kinds for p in k.paths) == sorted(real)  # every array in exactly one kind
    mesh = model.layout.mesh
    for kind in kinds:
        drawn = {p.device_id: p.bounds for p in kind.pieces}
        for path in kind.paths:
            a = real[path]
            assert (a.shape, a.sharding.shard_shape(a.shape)) == (kind.shape, kind.local_shape), path
            held = {s.device.id: bounds_of(s.index, a.shape) for s in a.addressable_shards}
            assert held == drawn, path
        for p in kind.pieces:
            assert mesh.devices[p.coords].id == p.device_id


EXPECTED = {
    "megatron-2x4": {
        "embed.table": "vocab-parallel",
        "attn_norm.scale": "replicated",
        "attn.q.kernel": "column-parallel",
        "attn.k.kernel": "column-parallel",
        "attn.o.kernel": "row-parallel",
        "mlp.gate.kernel": "column-parallel",
        "mlp.down.kernel": "row-parallel",
        "head.kernel": "vocab-parallel",
    },
    "fsdp-2x2x2": {
        "embed.table": "vocab-parallel + FSDP",
        "attn_norm.scale": "FSDP",
        "attn.q.kernel": "column-parallel + FSDP",
        "attn.k.kernel": "column-parallel + FSDP",
        "attn.o.kernel": "row-parallel + FSDP",
        "mlp.gate.kernel": "column-parallel + FSDP",
        "mlp.down.kernel": "row-parallel + FSDP",
        "head.kernel": "vocab-parallel + FSDP",
    },
    "kv-replicated-1x8": {
        "embed.table": "vocab-parallel",
        "attn_norm.scale": "replicated",
        "attn.q.kernel": "column-parallel",
        "attn.k.kernel": "replicated",
        "attn.o.kernel": "row-parallel",
        "mlp.gate.kernel": "column-parallel",
        "mlp.down.kernel": "row-parallel",
        "head.kernel": "vocab-parallel",
    },
}


@pytest.mark.parametrize("case", CASES)
def test_kinds_and_patterns(models, case):
    """Eight kinds in forward order (k with v, gate with up, every norm together), each named by its placement."""
    kinds = layout_cells(models[case])
    assert [k.names[0] for k in kinds] == list(EXPECTED[case])
    assert {k.names[0]: k.pattern for k in kinds} == EXPECTED[case]
    by_name = {n: k for k in kinds for n in k.names}
    assert by_name["attn.v.kernel"] is by_name["attn.k.kernel"]
    assert by_name["final_norm.scale"] is by_name["attn_norm.scale"]
    if case == "kv-replicated-1x8":  # every device holds all 4 kv heads, and the panel says why
        kv = by_name["attn.k.kernel"]
        assert {p.bounds for p in kv.pieces} == {((0, 64), (0, 4), (0, 8))}
        assert "4 kv heads < model axis 8" in kv.note


@pytest.mark.parametrize("case", CASES)
def test_png_has_its_size(models, case, tmp_path):
    path = tmp_path / f"{case}.png"
    kinds = plot_layout(models[case], path)
    assert figure_size(len(kinds)) == (1400, 920)  # 8 kinds: the header and two rows of four panels
    assert matplotlib.image.imread(path).shape[:2] == (920, 1400)


@pytest.mark.parametrize("rules", sorted(jaxtp.RULE_PRESETS))
@pytest.mark.parametrize("spec", ["2x4", "1x8", "2x2x2", "1x2x4"])
def test_every_preset_and_mesh(tiny, rules, spec):
    """Abstract (unallocated) scanned models with biases, qk-norm and a tied head, for every preset: the pieces
    tile each weight exactly (each element held by the devices the split implies) and have the shard's shape."""
    cfg = tiny.replace(scan_layers=True, qkv_bias=True, qk_norm=True, tie_embeddings=True)
    mesh = jaxtp.make_mesh(spec)
    layout = Layout.create(cfg, mesh, rules)
    model = abstract_sharded(
        lambda rngs: jaxtp.Transformer(cfg, layout=layout, rngs=rngs), mesh, rules=layout
    )
    for kind in layout_cells(model):
        holders = kind.holders()
        copies = mesh.devices.size // len(holders)
        assert all(len(ids) == copies for ids in holders.values()), kind.paths
        assert sum(math.prod(b - a for a, b in bounds) for bounds in holders) == math.prod(kind.shape)
        for p in kind.pieces:
            assert tuple(b - a for a, b in p.bounds) == kind.local_shape
        split = math.prod(kind.shape) // math.prod(kind.local_shape)
        assert (kind.pattern == "replicated") == (split == 1), (kind.paths, kind.pattern)


def test_scanned_3axis_png(tiny, tmp_path):
    """A scanned model's stacked kernels (merged dims, pieces cut apart per layer) draw; size follows the kinds."""
    cfg = tiny.replace(scan_layers=True, qkv_bias=True)
    mesh = jaxtp.make_mesh("1x2x4")
    layout = Layout.create(cfg, mesh, "fsdp-sp")
    model = abstract_sharded(
        lambda rngs: jaxtp.Transformer(cfg, layout=layout, rngs=rngs), mesh, rules=layout
    )
    kinds = plot_layout(model, tmp_path / "scanned.png")
    assert len(kinds) == 11
    width, height = figure_size(len(kinds))
    assert matplotlib.image.imread(tmp_path / "scanned.png").shape[:2] == (height, width) == (1230, 1400)
    assert not np.all(matplotlib.image.imread(tmp_path / "scanned.png") == 1.0)  # something was drawn
