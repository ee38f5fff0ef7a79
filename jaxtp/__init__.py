"""jaxtp: tensor-parallel Flax NNX transformers driven by one logical-axis rules table."""

from . import checkpoint, data, hf, hlo, loss, measure, planner, quant, train
from .build import create
from .checkpoint import load, save
from .config import PRESETS, ModelConfig
from .generation import filter_logits, generate, sample_logits
from .hardware import HARDWARE
from .hlo import Collectives, collectives
from .layers import MLP, Attention, Block, Embed, Linear, RMSNorm
from .layout_plot import plot_layout
from .mesh import make_mesh, parse_mesh_spec, use_cpu_devices
from .model import Transformer, abstract_model, param_table
from .planner import Plan, plan
from .quant import cast, precision_report
from .sharding import MEGATRON, RULE_PRESETS, Layout, axis_rules, resolve_rules, spec_for
from .train import TrainConfig, Trainer

__all__ = [
    # modules: jaxtp.hf (Hugging Face checkpoints), jaxtp.planner (format_plan, param_infos, ...), ...
    "checkpoint",
    "data",
    "hf",
    "hlo",
    "loss",
    "measure",
    "planner",
    "quant",
    "train",
    # building and sharding
    "ModelConfig",
    "PRESETS",
    "Transformer",
    "abstract_model",
    "create",
    "Layout",
    "MEGATRON",
    "RULE_PRESETS",
    "axis_rules",
    "resolve_rules",
    "spec_for",
    "make_mesh",
    "parse_mesh_spec",
    "use_cpu_devices",
    # layers
    "Attention",
    "Block",
    "Embed",
    "Linear",
    "MLP",
    "RMSNorm",
    # training, inspection, precision, generation, checkpoints, planning
    "TrainConfig",
    "Trainer",
    "param_table",
    "plot_layout",
    "collectives",
    "Collectives",
    "cast",
    "precision_report",
    "generate",
    "sample_logits",
    "filter_logits",
    "save",
    "load",
    "plan",
    "Plan",
    "HARDWARE",
]
