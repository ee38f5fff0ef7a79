"""config.json <-> ModelConfig for the Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2).

All four architectures compute the same decoder (pre-norm RMSNorm, rotate-half RoPE, GQA with query head
n reading kv head n // (N/K), SwiGLU); they differ only in the ModelConfig switches set here. What jaxtp
does not implement is refused with the reason, never approximated: a sliding window shorter than the
context, RoPE types other than default/llama3, biases on o_proj or the MLP, activations other than SiLU.
"""

from __future__ import annotations

from ..config import ModelConfig
from .files import CheckpointError, read_json, resolve

__all__ = ["ARCHITECTURES", "MODEL_TYPES", "architecture", "from_hf", "config", "to_hf"]

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def architecture(hf: dict, where="config.json") -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else {v: k for k, v in MODEL_TYPES.items()}.get(hf.get("model_type"))
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: architecture {arch or hf.get('model_type')!r} is not supported; jaxtp.hf "
            f"loads {', '.join(ARCHITECTURES)}"
        )
    return arch


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 5's `rope_parameters` or 4.x's `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10_000.0)))
    scaling = {**legacy, **params}
    kind = scaling.pop("type", None)
    scaling.setdefault("rope_type", kind or "default")
    return theta, scaling


def from_hf(hf: dict, max_seq_len: int | None = None, where: str = "config.json", **overrides) -> ModelConfig:
    """The ModelConfig of a Hugging Face config dict (see the module docstring for what is refused)."""
    arch = architecture(hf, where)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported; jaxtp's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported (jaxtp's MLP has no biases)")
    if arch != "Qwen2ForCausalLM" and hf.get("attention_bias"):
        raise CheckpointError(
            f"{where}: attention_bias=true (a bias on o_proj too) is not supported; jaxtp "
            "implements Qwen2's q/k/v biases only"
        )
    theta, scaling = _rope(hf)
    if scaling["rope_type"] not in ("default", "llama3"):
        raise CheckpointError(
            f"{where}: rope_type {scaling['rope_type']!r} is not supported; jaxtp implements default and llama3 RoPE"
        )
    try:
        D, N = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        ctx = int(max_seq_len or hf.get("max_position_embeddings") or 0)
        cfg = ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=D,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=N,
            n_kv_heads=int(hf.get("num_key_value_heads") or N),
            d_ff=int(hf["intermediate_size"]),
            max_seq_len=ctx,
            head_dim=int(hf.get("head_dim") or D // N),
            rope_theta=theta,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_std=float(hf.get("initializer_range", 0.02)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM",
            rope_scaling=None if scaling["rope_type"] == "default" else scaling,
            **overrides,
        )
    except KeyError as e:
        raise CheckpointError(f"{where} lacks {e.args[0]!r}; it is not a complete {arch} config") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", arch == "MistralForCausalLM")
    if uses_window and window and int(window) < cfg.max_seq_len:
        raise CheckpointError(
            f"{where}: sliding_window={window} is shorter than the context ({cfg.max_seq_len}) and jaxtp has no "
            f"sliding-window attention; load with max_seq_len={window} (within the window the model is exact)"
        )
    return cfg


def config(path, max_seq_len: int | None = None, **overrides) -> ModelConfig:
    """The ModelConfig of the checkpoint at `path` (config.json only: no weights are read), for planning."""
    directory = resolve(path)
    return from_hf(
        read_json(directory / "config.json", "a Hugging Face checkpoint needs it"),
        max_seq_len,
        where=str(directory / "config.json"),
        **overrides,
    )


def to_hf(cfg: ModelConfig, dtype: str, architecture: str | None = None, extra: dict | None = None) -> dict:
    """A config.json for `cfg` that transformers loads unchanged. The architecture is Qwen3 for qk-norm,
    Qwen2 for q/k/v biases, else Llama (a Mistral without an active window computes the same)."""
    arch = architecture or (
        "Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    )
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    if cfg.qk_norm != (arch == "Qwen3ForCausalLM") or cfg.qkv_bias != (arch == "Qwen2ForCausalLM"):
        raise ValueError(
            f"a model with qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias} cannot be saved as {arch}"
        )
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling or ())}
    out = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.d_ff,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "dtype": dtype,
        "torch_dtype": dtype,
        "attention_bias": False,
        "mlp_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = rope
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if extra and key in extra:
            out[key] = extra[key]
    return out
