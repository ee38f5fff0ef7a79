"""jaxtp: tensor-parallel Flax NNX transformers driven by one logical-axis rules table."""

from .config import ModelConfig, PRESETS
from . import hlo, loss
from . import data, measure, train
from .hlo import collectives, Collectives
from .train import TrainConfig, Trainer
from .layers import Attention, Block, Embed, Linear, MLP, RMSNorm
from .mesh import make_mesh, parse_mesh_spec, use_cpu_devices
from .model import Transformer, param_table, abstract_model
from .sharding import Layout, MEGATRON, RULE_PRESETS, axis_rules, resolve_rules, spec_for
from .build import create

__all__ = [
    "ModelConfig", "PRESETS", "collectives", "Collectives", "Attention", "Block", "Embed", "Linear", "MLP",
    "RMSNorm", "make_mesh", "parse_mesh_spec", "use_cpu_devices", "Transformer", "param_table",
    "abstract_model", "Layout", "MEGATRON", "RULE_PRESETS", "axis_rules", "create", "resolve_rules", "spec_for",
]

from .generate import generate, sample_logits, filter_logits  # noqa: E402  (jaxtp.generate is the function)
__all__ += ["generate", "sample_logits", "filter_logits"]

from . import quant  # noqa: E402
from .quant import cast, precision_report  # noqa: E402
__all__ += ["quant", "cast", "precision_report"]

from .plan import plan, Plan, HARDWARE  # noqa: E402  (jaxtp.plan is the function; helpers are its attributes)
__all__ += ["plan", "Plan", "HARDWARE"]

from . import checkpoint  # noqa: E402
from .checkpoint import save, load  # noqa: E402
__all__ += ["checkpoint", "save", "load"]

from . import hf  # noqa: E402  (jaxtp.hf.load / save / config / tokenizer: Hugging Face checkpoints)
__all__ += ["hf"]
