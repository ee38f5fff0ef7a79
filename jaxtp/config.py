"""ModelConfig: one frozen description of a transformer's shape and dtypes.

Fields use readable names; the formula letters used in the cost model (D, L, N, K, H, F, V)
are read-only aliases so planner code can read like the equations in docs/planner.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

__all__ = [
    "REMAT_CHOICES",
    "ATTENTION_CHOICES",
    "DEFAULT_ATTENTION_BLOCK",
    "DTYPES",
    "DTYPE_NAMES",
    "to_dtype",
    "ModelConfig",
    "ROPE_TYPES",
    "normalise_rope_scaling",
    "PRESETS",
]

REMAT_CHOICES = ("none", "full", "dots")  # what each keeps: jaxtp.model.REMAT_POLICIES
ATTENTION_CHOICES = ("auto", "xla", "blockwise", "cudnn")  # jaxtp.attention: what each runs, and auto's rule
# Blockwise attention's query and key block. Measured on XLA:CPU (train step of the `small` preset, S = 64
# to 2048): blocks of 64 and 128 ran alike, 256 and 512 slower (the smaller score blocks stay in cache and
# the causal skip cuts closer to the diagonal); each block pair's f32 scores are [B, K, G, 128, 128].
DEFAULT_ATTENTION_BLOCK = 128
DTYPES = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
DTYPE_NAMES = {"f32": "float32", "bf16": "bfloat16"}  # a float precision (jaxtp.quant) as a config dtype


def to_dtype(name: str | Any):
    """Accept 'float32'/'f32'/'bfloat16'/'bf16' or a dtype; raise a clear error otherwise."""
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[name])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Llama-style LM (RMSNorm, RoPE, GQA attention, SwiGLU MLP).

    The defaults are jaxtp's own models (untied head, no biases). The fields after `scan_layers` cover the
    Hugging Face Llama family (jaxtp.hf): tied embeddings (Llama 3.2, Qwen2 small sizes, SmolLM2), q/k/v
    biases (Qwen2), a per-head RMSNorm on q and k before RoPE (Qwen3) and Llama 3.1's RoPE rescaling.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 2
    d_ff: int = 128
    max_seq_len: int = 64
    head_dim: int | None = None  # defaults to d_model // n_heads
    param_dtype: str = "float32"  # storage (master weights)
    compute_dtype: str = "float32"  # matmul inputs/activations
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    remat: str = "none"  # per-block rematerialisation in the backward: none | full | dots
    scan_layers: bool = False  # one Block with params stacked on a leading "layers" axis, run by lax.scan
    tie_embeddings: bool = False  # the head reads the embedding table (one vocab-parallel [V, D] array)
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    # RoPE frequency rescaling as sorted (key, value) pairs, e.g. (("factor", 8.0), ..., ("rope_type", "llama3"));
    # a dict is accepted and normalised (a frozen config must hash: it is part of the model's static graph).
    rope_scaling: tuple | None = None
    attention: str = "auto"  # auto | xla | blockwise | cudnn (jaxtp.attention)
    attention_block: int = DEFAULT_ATTENTION_BLOCK  # blockwise's query/key block size

    def __post_init__(self):
        for f in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_ff",
            "max_seq_len",
            "attention_block",
        ):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelConfig.{f} must be a positive integer, got {v!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"ModelConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly or change n_heads"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention shares each kv head among n_heads/n_kv_heads query heads)"
            )
        to_dtype(self.param_dtype)
        to_dtype(self.compute_dtype)
        if self.remat not in REMAT_CHOICES:
            raise ValueError(
                f"ModelConfig.remat must be one of {', '.join(REMAT_CHOICES)}; got {self.remat!r}"
            )
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"ModelConfig.attention must be one of {', '.join(ATTENTION_CHOICES)}; got {self.attention!r}"
            )
        for f in ("scan_layers", "tie_embeddings", "qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"ModelConfig.{f} must be True or False, got {getattr(self, f)!r}")
        object.__setattr__(self, "rope_scaling", normalise_rope_scaling(self.rope_scaling))

    # Formula-letter aliases (docs/planner.md notation).
    D = property(lambda self: self.d_model)
    L = property(lambda self: self.n_layers)
    N = property(lambda self: self.n_heads)
    K = property(lambda self: self.n_kv_heads)
    H = property(lambda self: self.head_dim)
    F = property(lambda self: self.d_ff)
    V = property(lambda self: self.vocab_size)

    def replace(self, **changes) -> "ModelConfig":
        if "d_model" in changes or "n_heads" in changes:
            changes.setdefault("head_dim", None)
        return dataclasses.replace(self, **changes)

    def padded_vocab(self, model_axis: int) -> int:
        """Vocab rounded up to a multiple of the model axis so the head and embedding split evenly."""
        return -(-self.vocab_size // model_axis) * model_axis

    def param_count(self) -> int:
        """Parameters in the declared (unpadded) model."""
        D, L, V, N, K, H = self.D, self.L, self.V, self.N, self.K, self.H
        per_layer = 2 * D + (N * H + 2 * K * H if self.qkv_bias else 0) + (2 * H if self.qk_norm else 0)
        return self.matmul_param_count() + L * per_layer + D + (0 if self.tie_embeddings else V * D)

    def matmul_param_count(self) -> int:
        """Weights that multiply activations (the FLOPs model's P): every block kernel and the head, which
        is the embedding table when tied; not the embedding lookup, norms or biases."""
        D, F, L, V, N, K, H = self.D, self.F, self.L, self.V, self.N, self.K, self.H
        return L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + V * D

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ROPE_TYPES = ("default", "llama3")


def normalise_rope_scaling(scaling) -> tuple | None:
    """None, or sorted (key, value) pairs of a known rope_type; accepts a dict or pairs (JSON gives lists)."""
    if scaling is None:
        return None
    items = dict(scaling.items() if isinstance(scaling, dict) else (tuple(kv) for kv in scaling))
    kind = items.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"ModelConfig.rope_scaling: rope_type {kind!r} is not supported; jaxtp implements {', '.join(ROPE_TYPES)}"
        )
    if kind == "default":
        return None
    need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in need if k not in items]
    if missing:
        raise ValueError(f"ModelConfig.rope_scaling ({kind}) lacks {', '.join(missing)}")
    return tuple(sorted(items.items()))


PRESETS: dict[str, ModelConfig] = {
    # Tests: 8 heads and d_ff 128 divide every model axis up to 8; 4 kv heads < 8 exercises kv replication on 1x8.
    "tiny": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=128, max_seq_len=64
    ),
    # run.py default: ~0.8M params, trains to < 2 nats/byte in about two minutes on 2 CPU cores.
    "small": ModelConfig(
        vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=384, max_seq_len=128
    ),
    # Planning shapes: never allocated on CPU.
    "gpt2-124m": ModelConfig(
        vocab_size=50304,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        d_ff=3072,
        max_seq_len=1024,
        param_dtype="float32",
        compute_dtype="bfloat16",
    ),
    "1b": ModelConfig(
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        d_ff=8192,
        max_seq_len=8192,
        compute_dtype="bfloat16",
        rope_theta=500_000.0,
    ),
    "7b": ModelConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        d_ff=11008,
        max_seq_len=4096,
        compute_dtype="bfloat16",
    ),
    "70b": ModelConfig(
        vocab_size=128256,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        d_ff=28672,
        max_seq_len=8192,
        compute_dtype="bfloat16",
        rope_theta=500_000.0,
    ),
}
