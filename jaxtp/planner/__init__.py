"""Analytic cost model: memory, FLOPs, collectives and step time per device, before anything runs.

`jaxtp.plan(cfg, "16x8", batch_size=..., seq_len=...)` answers "will it fit, and is TP
communication-bound?" without devices. Parameter shapes and placements come from the model's own
declarations (`abstract_model` + the rules table), so parameter and optimizer bytes are exact;
activations and collectives follow what XLA compiles for this model, measured on XLA:CPU with fake
devices and checked in tests/test_plan.py (megatron; xla and blockwise attention) and
tests/test_strategies.py (megatron-sp, fsdp, fsdp-sp) against `compiled.memory_analysis()` and the HLO.
The formulas and the reasoning behind them: docs/planner.md.

Modules: shapes (meshes without devices), params (parameters and their roles), dims (the sizes every
formula reads), memory, collectives, timing (FLOPs, step time, R), report (format_plan), core (plan, Plan).
"""

from .core import Plan, plan
from .params import ParamInfo, optimizer_bytes, param_infos
from .report import format_plan
from .shapes import MeshShape

__all__ = ["plan", "Plan", "format_plan", "param_infos", "optimizer_bytes", "ParamInfo", "MeshShape"]
