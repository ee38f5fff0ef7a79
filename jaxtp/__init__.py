"""jaxtp: tensor-parallel Flax NNX transformers driven by one logical-axis rules table."""

from .config import ModelConfig, PRESETS
from . import hlo, loss
from .hlo import collectives, Collectives
from .layers import Attention, Block, Embed, Linear, MLP, RMSNorm
from .mesh import make_mesh, parse_mesh_spec, use_cpu_devices
from .model import Transformer, param_table, abstract_model
from .sharding import Layout, MEGATRON, RULE_PRESETS, resolve_rules, spec_for

__all__ = [
    "ModelConfig", "PRESETS", "collectives", "Collectives", "Attention", "Block", "Embed", "Linear", "MLP",
    "RMSNorm", "make_mesh", "parse_mesh_spec", "use_cpu_devices", "Transformer", "param_table",
    "abstract_model", "Layout", "MEGATRON", "RULE_PRESETS", "resolve_rules", "spec_for",
]
