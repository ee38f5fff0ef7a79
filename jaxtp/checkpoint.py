"""Orbax checkpoints: models for inference, and full train states for exact resume.

Arrays go through Orbax (tensorstore; no pickle, nothing executable is ever loaded) and are restored
straight into abstract, sharded targets for the mesh at hand, so a checkpoint saved on 2x4 loads onto
1x8 or 1x1 without a full host copy. The model config and precision travel beside the arrays as JSON.
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a process
killed mid-write leaves nothing that `latest_step` or `load` would pick up.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from .build import abstract_sharded
from .config import ModelConfig
from .model import Transformer
from .quant import QUANTIZED, converting, precision_of
from .sharding import Layout

__all__ = [
    "FORMAT",
    "TRAIN_FORMAT",
    "model_meta",
    "abstract_for",
    "save",
    "read_meta",
    "load",
    "TrainCheckpoints",
]

FORMAT = "jaxtp-model/1"
TRAIN_FORMAT = "jaxtp-train/1"


def _abstract(tree):
    """ShapeDtypeStructs with the arrays' own shardings: the restore target of a live train state."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def model_meta(model) -> dict:
    """The config travels for a Transformer; a module of the user's own is rebuilt by `load(..., build=)`."""
    config = dataclasses.asdict(model.cfg) if isinstance(model, Transformer) else None
    return {
        "format": FORMAT,
        "config": config,
        "precision": precision_of(model),
        "module": type(model).__name__,
    }


def abstract_for(meta: dict, mesh, rules=None) -> nnx.Module:
    """An abstract model of the checkpoint's config and precision, sharded for `mesh`."""
    cfg = ModelConfig(
        **{k: v for k, v in meta["config"].items() if k != "head_dim"},
        head_dim=meta["config"].get("head_dim"),
    )
    layout = Layout.create(cfg, mesh, rules)
    # float precisions live in the config's dtypes; only the int8 storage needs the cast
    precision = meta["precision"] if meta["precision"] in QUANTIZED else "f32"
    build = converting(lambda rngs: Transformer(cfg, layout=layout, rngs=rngs), precision)
    return abstract_sharded(build, mesh, layout)


def save(path, model, *, force: bool = False) -> pathlib.Path:
    """Save `model` (any precision) to the directory `path`; refuses to overwrite unless `force`."""
    path = pathlib.Path(path).absolute()
    if path.exists() and not force:
        raise FileExistsError(f"checkpoint path {path} already exists; choose a new path or pass force=True")
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            path,
            ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(model_meta(model))),
            force=force,
        )
    return path


def read_meta(path, expect: str = FORMAT) -> dict:
    """The checkpoint's JSON metadata; one-line errors for a missing, incomplete or foreign checkpoint."""
    path = pathlib.Path(path).absolute()
    meta_file = path / "meta" / "metadata"
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path} (directory does not exist)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not a complete jaxtp checkpoint: cannot read {meta_file.name} ({type(e).__name__})"
        ) from None
    if meta.get("format") != expect:
        raise ValueError(f"{path} holds format {meta.get('format')!r}, expected {expect!r}")
    return meta


def _restore(path, target_state: dict, what: str) -> dict:
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            return ckptr.restore(path, ocp.args.Composite(state=ocp.args.StandardRestore(target_state)))[
                "state"
            ]
    except Exception as e:  # orbax/tensorstore raise many types; the user needs one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot restore {what} from {path}: the checkpoint is truncated, corrupted or "
            f"incompatible ({type(e).__name__}: {first})"
        ) from None


def load(path, mesh, rules=None, *, build=None) -> nnx.Module:
    """Load a model saved by `save` onto `mesh` (any mesh: arrays are resharded on restore). A module of
    your own needs `build`, the `fn(rngs)` you gave jaxtp.create: it is traced for shapes, never run."""
    path = pathlib.Path(path).absolute()
    meta = read_meta(path)
    if build is not None:
        abstract = abstract_sharded(converting(build, meta["precision"]), mesh, rules)
    elif meta.get("config") is None:
        raise ValueError(
            f"{path} holds a {meta.get('module', 'module')} of your own, not a Transformer: pass "
            "build=lambda rngs: YourModel(..., rngs=rngs), as given to jaxtp.create"
        )
    else:
        abstract = abstract_for(meta, mesh, rules)
    graphdef, state = nnx.split(abstract)
    restored = _restore(path, nnx.to_pure_dict(state), "model")
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


class TrainCheckpoints:
    """Full train state (params, optimizer state, step, loss history) every N steps, keeping the last K."""

    def __init__(self, directory, keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict):
        state = {"params": nnx.to_pure_dict(params), "opt_state": opt_state}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"format": TRAIN_FORMAT, **meta})
            ),
        )

    def restore(self, params, opt_state, step: int | None = None):
        """Restore into the shardings of the given (freshly built) params and optimizer state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory} to resume from")
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        target = {"params": _abstract(nnx.to_pure_dict(params)), "opt_state": _abstract(opt_state)}
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"cannot resume from {self.directory}/{step}: truncated, corrupted or incompatible "
                f"checkpoint ({type(e).__name__}: {first})"
            ) from None
        nnx.replace_by_pure_dict(params, got["state"]["params"])
        return step, params, got["state"]["opt_state"], meta

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
