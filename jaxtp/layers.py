"""Transformer layers that name logical axes only.

Each parameter is an `nnx.Param` whose `out_sharding` metadata holds logical names such as
("embed", "heads", "head_dim"); `sharding.Layout` turns those into mesh placements. Activations are
pinned only where a block's layout changes hands, each with a name tuple below:
  RESIDUAL   the residual stream between blocks: the embedding's output, after the attention output
             projection and the MLP down projection (where Megatron's all-reduces sit), after each add;
  BLOCK_IN   what attention and the MLP read: every position of the normalised stream;
  HEADS      q after RoPE and the attention output (column-parallel over heads), KV for k and v;
  HIDDEN     the SwiGLU hidden activation (column-parallel over mlp).
Under megatron these agree with what propagation finds anyway; they exist so that other tables work
without touching a layer: sequence parallelism splits RESIDUAL's "act_seq" (the reduce-scatter lands on
the projections' outputs, the all-gather on BLOCK_IN), and FSDP splits the weights' "embed", which the
activations name "act_embed" instead. Weights are read through `gathered` (a no-op unless the table
stores a weight split over a batch axis, i.e. ZeRO-3 / FSDP).

Tensor names carry their shape: B batch, S query positions, T key positions, D model width,
N query heads, K kv heads, G query heads per kv head, H head dim, F MLP hidden, V (padded) vocab;
C the q/k/v slots of a stacked kernel, X its head axis (K or N).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from . import int8
from .attention import attend
from .config import ModelConfig, to_dtype
from .sharding import Layout, constrain, gathered, layer_layout, placing

__all__ = [
    "RESIDUAL",
    "BLOCK_IN",
    "KV",
    "HEADS",
    "HIDDEN",
    "normal_param",
    "Linear",
    "matmul_rows",
    "RMSNorm",
    "rope_frequencies",
    "rope",
    "layer_config",
    "default_positions",
    "Attention",
    "MLP",
    "Block",
    "Embed",
]

RESIDUAL = ("batch", "act_seq", "act_embed")
BLOCK_IN = ("batch", "seq", "act_embed")
KV = ("batch", "seq", "kv_heads", "head_dim")
HEADS = ("batch", "seq", "heads", "head_dim")
HIDDEN = ("batch", "seq", "mlp")


def normal_param(rngs: nnx.Rngs, shape, names, std: float, dtype) -> nnx.Param:
    """A N(0, std^2) parameter drawn in f32, stored in `dtype`, named by `names` for the rules table."""
    # The barrier keeps XLA from folding std into the draw's own constants inside a jitted init, which
    # rounded differently from the same draw run eagerly (Flax's eager sharding): both paths now agree bitwise.
    value = std * jax.lax.optimization_barrier(jax.random.normal(rngs.params(), shape, jnp.float32))
    return nnx.Param(value.astype(dtype), out_sharding=tuple(names))


class Linear(nnx.Module):
    """An einsum with a named kernel, e.g. 'bsd,dnh->bsnh' with kernel names (embed, heads, head_dim).

    `contract` counts the kernel's leading (input) axes; the remaining axes are outputs. With `bias`, a
    zero-initialised bias over the output axes (named like them) is added after the matmul. Quantized
    (`set_precision("int8" | "w8a8")`), `kernel` is an int8 `Int8Weight` and `scale` its per-output-channel
    `Int8Scale` (jaxtp.int8).
    """

    def __init__(
        self,
        equation: str,
        shape,
        names,
        *,
        std: float,
        cfg: ModelConfig,
        rngs: nnx.Rngs,
        layout: Layout | None = None,
        bias: bool = False,
    ):
        self.equation = equation
        self.names = tuple(names)
        lhs, rhs_out = equation.split(",")
        rhs, out = rhs_out.split("->")
        self.contract = sum(1 for c in rhs if c in lhs and c not in out)
        lead = lhs[: len(lhs) - self.contract]
        if lhs[len(lead) :] != rhs[: self.contract] or out != lead + rhs[self.contract :]:
            raise ValueError(
                f"Linear equation {equation!r} must read 'LEAD IN, IN OUT -> LEAD OUT' "
                "(the kernel's leading axes contract the input's trailing axes)"
            )
        self.compute_dtype = to_dtype(cfg.compute_dtype)
        self.layout = layer_layout(layout, cfg)
        with placing(self.layout):
            self.kernel = normal_param(rngs, shape, names, std, to_dtype(cfg.param_dtype))
            self.bias = (
                nnx.Param(
                    jnp.zeros(shape[self.contract :], to_dtype(cfg.param_dtype)),
                    out_sharding=self.names[self.contract :],
                )
                if bias
                else None
            )
        self.quant_mode: str | None = None  # "int8" (weight-only) or "w8a8" once quantized
        self.scale: int8.Int8Scale | None = nnx.data(None)  # the int8 kernel's per-output-channel scale

    def __call__(self, x):
        if self.quant_mode is not None:
            return self.add_bias(
                int8.quantized_einsum(
                    self.quant_mode, self.equation, x, self.kernel[...], self.scale[...], self.compute_dtype
                )
            )

        def matmul(x, w):
            return matmul_rows(x.astype(self.compute_dtype), self.read(w), self.contract)

        if self.layout is not None and self.layout.needs_gather(self.names):
            matmul = jax.checkpoint(matmul)  # ZeRO-3: gather again in the backward rather than keep it
        return self.add_bias(matmul(x, self.kernel[...]))

    def add_bias(self, y, bias=None):
        """y + the bias (or `bias`, e.g. one expanded to replicated heads), in y's dtype; y without one."""
        bias = self.bias[...] if bias is None and self.bias is not None else bias
        return y if bias is None else y + bias.astype(y.dtype)

    def read(self, w=None):
        """The kernel as the matmul reads it: gathered where stored split over a batch axis, in the
        compute dtype."""
        w = self.kernel[...] if w is None else w
        return gathered(w, self.names, self.layout).astype(self.compute_dtype)

    def fusable(self) -> bool:
        """Whether this kernel may be stacked with its siblings' into one matmul (float, no ZeRO gather)."""
        return self.quant_mode is None and (self.layout is None or not self.layout.needs_gather(self.names))

    def contracted_axes(self) -> range:
        """The kernel axes the matmul contracts, after any stacked leading axes (a scanned model's "layers"):
        each layer keeps its own per-channel scales, so the stacked axis is never reduced."""
        stacked = self.kernel[...].ndim - len(self.names)
        return range(stacked, stacked + self.contract)

    def set_precision(self, precision: str) -> None:
        """jaxtp.quant.cast's hook (the float arrays themselves are cast there): a float precision sets the
        compute dtype; "int8"/"w8a8" quantize the kernel once and then only switch the mode."""
        if precision not in int8.MODES:
            self.compute_dtype = to_dtype(precision)
            return
        if self.quant_mode is None:
            self.kernel, self.scale = int8.quantize_variable(self.kernel, self.contracted_axes())
        self.quant_mode = precision


def matmul_rows(x, w, contract: int):
    """x's trailing `contract` axes times w's leading ones, with x's other axes flattened into rows.

    The same result as the einsum, but XLA:CPU then runs each dot and its backward on its fast path: a
    weight gradient contracting (batch, seq) of a 3-D activation got a strided transposing copy first
    (the D256/F1024 train step ran 1.25x slower). The leading axes merge into rows (batch over data stays
    their major split); w's output axes stay apart, so a stacked kernel [D, K, G+2, H] keeps K's split local."""
    lead, k_in = x.shape[: x.ndim - contract], w.shape[:contract]
    w_IO = w.reshape(math.prod(k_in), *w.shape[contract:])
    y = jax.lax.dot_general(x.reshape(math.prod(lead), math.prod(k_in)), w_IO, (((1,), (0,)), ((), ())))
    return y.reshape(*lead, *w.shape[contract:])


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, the scale applied after normalising (in f32). Default: the model width
    ("embed"); Qwen3's q/k norms use size=head_dim, names=("head_dim",)."""

    def __init__(
        self,
        cfg: ModelConfig | None = None,
        layout: Layout | None = None,
        size: int | None = None,
        names: tuple = ("embed",),
        **dims,
    ):
        cfg = layer_config(cfg, dims)
        self.eps = cfg.norm_eps
        self.layout = layer_layout(layout, cfg)
        self.names = tuple(names)
        with placing(self.layout):
            self.scale = nnx.Param(
                jnp.ones((size or cfg.d_model,), to_dtype(cfg.param_dtype)), out_sharding=self.names
            )

    def __call__(self, x_BSD):
        x = x_BSD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * gathered(self.scale[...], self.names, self.layout).astype(jnp.float32)).astype(
            x_BSD.dtype
        )


def rope_frequencies(H: int, theta: float, scaling: tuple | None = None):
    """The H/2 inverse frequencies, f32. Llama 3.1's scaling (rope_type "llama3") divides the frequencies
    whose wavelength exceeds original_max_position_embeddings / low_freq_factor by `factor`, keeps those
    shorter than .../high_freq_factor, and blends linearly in wavelength-inverse between (the same
    formula as Meta's reference and transformers' rope utilities)."""
    freq = 1.0 / (theta ** (jnp.arange(0, H // 2, dtype=jnp.float32) * 2.0 / H))
    if scaling is None:
        return freq
    p = dict(scaling)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    scaled = jnp.where(wavelen > old_len / low, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, blended, scaled).astype(jnp.float32)


def rope(x_BSnH, positions_BS, theta: float, scaling: tuple | None = None):
    """Rotary embedding (rotate-half form), computed in f32."""
    H = x_BSnH.shape[-1]
    freq = rope_frequencies(H, theta, scaling)
    angle_BSh = positions_BS[..., None].astype(jnp.float32) * freq
    sin, cos = jnp.sin(angle_BSh)[:, :, None, :], jnp.cos(angle_BSh)[:, :, None, :]
    x = x_BSnH.astype(jnp.float32)
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BSnH.dtype)


def layer_config(cfg: ModelConfig | None, dims: dict) -> ModelConfig:
    """A layer's sizes: a ModelConfig, or just the dimensions it uses as keywords (d_model=64, n_heads=8,
    ...; ModelConfig's defaults fill the rest), or a ModelConfig with some of them replaced."""
    if cfg is None:
        return ModelConfig(**dims)
    return cfg.replace(**dims) if dims else cfg


def _need(rngs, layer: str):
    if rngs is None:
        raise TypeError(f"{layer} needs rngs: {layer}(..., rngs=nnx.Rngs(seed))")
    return rngs


def default_positions(x_BS_):
    """0..S-1 in every row, for an input [B, S, ...]."""
    B, S = x_BS_.shape[:2]
    return jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))


class Attention(nnx.Module):
    """GQA attention: q/k/v column-parallel over heads, output projection row-parallel. causal=False makes
    it bidirectional (an encoder's). cfg.attention picks the implementation (jaxtp.attention.attend)."""

    def __init__(
        self,
        cfg: ModelConfig | None = None,
        layout: Layout | None = None,
        rngs: nnx.Rngs | None = None,
        *,
        causal: bool = True,
        **dims,
    ):
        cfg, rngs = layer_config(cfg, dims), _need(rngs, "Attention")
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.layout, self.theta, self.rope_scaling = (
            layer_layout(layout, cfg),
            cfg.rope_theta,
            cfg.rope_scaling,
        )
        self.causal = causal
        self.attention, self.attention_block = cfg.attention, cfg.attention_block
        linear = functools.partial(Linear, cfg=cfg, rngs=rngs, layout=self.layout)
        self.q = linear(
            "bsd,dnh->bsnh", (D, N, H), ("embed", "heads", "head_dim"), std=std, bias=cfg.qkv_bias
        )
        self.k = linear(
            "bsd,dkh->bskh", (D, K, H), ("embed", "kv_heads", "head_dim"), std=std, bias=cfg.qkv_bias
        )
        self.v = linear(
            "bsd,dkh->bskh", (D, K, H), ("embed", "kv_heads", "head_dim"), std=std, bias=cfg.qkv_bias
        )
        self.o = linear("bsnh,nhd->bsd", (N, H, D), ("heads", "head_dim", "embed"), std=out_std)
        norm = functools.partial(RMSNorm, cfg, self.layout, H, ("head_dim",))
        self.q_norm, self.k_norm = (norm(), norm()) if cfg.qk_norm else (None, None)

    def rotated(self, x_BSnH, norm, positions_BS):
        """q or k as attention reads it: per-head RMSNorm (Qwen3's qk-norm) if any, then RoPE."""
        x_BSnH = x_BSnH if norm is None else norm(x_BSnH)
        return rope(x_BSnH, positions_BS, self.theta, self.rope_scaling)

    def project_kv(self, x_BSD, positions_BS):
        """Keys (rotated) and values, [B, S, K, H]: what the kv cache stores, and the unfused path's k, v
        (with replicated kv heads, its backward sums dK, dV over each kv group and all-gathers them)."""
        k_BSKH = constrain(self.rotated(self.k(x_BSD), self.k_norm, positions_BS), KV, self.layout)
        return k_BSKH, constrain(self.v(x_BSD), KV, self.layout)

    def project_q(self, x_BSD, positions_BS):
        """Queries (rotated), split over heads."""
        return constrain(self.rotated(self.q(x_BSD), self.q_norm, positions_BS), HEADS, self.layout)

    def fused(self) -> bool:
        """q, k and v run as one matmul when their kernels are float (no ZeRO gather) and the kv heads
        are split like the query heads or replicated beside them (K < model axis)."""
        rules = {} if self.layout is None else self.layout.rules
        same_split = rules.get("heads") == rules.get("kv_heads")
        return (same_split or self.kv_replicated()) and all(lin.fusable() for lin in (self.q, self.k, self.v))

    def kv_replicated(self) -> bool:
        """Query heads split over a mesh axis that the kv heads (fewer than its size) are replicated over."""
        rules = {} if self.layout is None else self.layout.rules
        return rules.get("kv_heads") is None and rules.get("heads") is not None

    def project_qkv(self, x_BSD, positions_BS):
        """q, k, v of x, as one matmul when fused (see stacked_qkv_kernel). The backward then adds the
        three input gradients before the model-axis all-reduce (XLA:CPU does not reassociate
        all-reduce(a) + all-reduce(b)), so it moves D per position once instead of 3 times."""
        if not self.fused():
            return (self.project_q(x_BSD, positions_BS), *self.project_kv(x_BSD, positions_BS))
        w_DXCH = self.stacked_qkv_kernel()
        y_BSXCH = matmul_rows(x_BSD.astype(w_DXCH.dtype), w_DXCH, 1)
        B, S, X, C, H = y_BSXCH.shape
        q_BSNH = self.q.add_bias(y_BSXCH[..., : C - 2, :].reshape(B, S, -1, H))
        q_BSNH = constrain(self.rotated(q_BSNH, self.q_norm, positions_BS), HEADS, self.layout)
        # Replicated kv heads were projected once per query head: so are their biases.
        expand = (
            (lambda b: jnp.repeat(b[...], X // b.shape[0], axis=0))
            if self.kv_replicated()
            else (lambda b: b[...])
        )
        k_BSXH, v_BSXH = (
            lin.add_bias(y_BSXCH[..., c, :], None if lin.bias is None else expand(lin.bias))
            for lin, c in ((self.k, C - 2), (self.v, C - 1))
        )
        kv_names = HEADS if self.kv_replicated() else KV
        k_BSXH = constrain(self.rotated(k_BSXH, self.k_norm, positions_BS), kv_names, self.layout)
        return q_BSNH, k_BSXH, constrain(v_BSXH, kv_names, self.layout)

    def stacked_qkv_kernel(self):
        """The q, k, v kernels stacked on a new unsplit axis C, never a split of the sharded one.

        Kv heads split like the query heads: per kv head, [D, K, G+2, H] (q's G heads of the group, then
        k, then v); each device keeps its K slice whole. Kv heads replicated over the model axis: per
        query head, [D, N, 3, H], k and v expanded to their N query heads by a one-hot [N, K] matmul. Each
        device then projects only the k/v of its own query heads, with no forward collective, and the
        transpose of that matmul sums the kv weight gradient over the query heads in one all-reduce,
        where a replicated K/V projection costs an all-reduce plus two all-gathers of dK, dV per layer."""
        wq_DNH = self.q.read()
        (D, N, H), K = wq_DNH.shape, self.k.kernel.shape[1]
        G = N // K
        if self.kv_replicated():
            # Expanded in the parameter dtype, so that the gradient sum crosses devices in f32 under bf16 compute.
            expand_NK = (jnp.arange(N)[:, None] // G == jnp.arange(K)[None, :]).astype(self.k.kernel.dtype)
            wk_DNH, wv_DNH = (
                jnp.einsum("dkh,nk->dnh", lin.kernel[...], expand_NK).astype(wq_DNH.dtype)
                for lin in (self.k, self.v)
            )
            return jnp.stack([wq_DNH, wk_DNH, wv_DNH], axis=2)
        wk_DKH, wv_DKH = self.k.read(), self.v.read()
        return jnp.concatenate([wq_DNH.reshape(D, K, G, H), wk_DKH[:, :, None], wv_DKH[:, :, None]], axis=2)

    def __call__(self, x_BSD, positions_BS=None, kv=None, k_pos_BT=None, k_valid_BT=None, mask_BST=None):
        """Self-attention over x; or, with `kv`=(k_BTKH, v_BTKH) from a cache, over those keys. Positions
        default to 0..S-1 in every row; `mask_BST` (True = may attend) restricts it further."""
        positions_BS = default_positions(x_BSD) if positions_BS is None else positions_BS
        x_BSD = constrain(x_BSD, BLOCK_IN, self.layout)
        if kv is None:
            q_BSNH, *kv = self.project_qkv(x_BSD, positions_BS)
            k_pos_BT = positions_BS
        else:
            q_BSNH = self.project_q(x_BSD, positions_BS)
        # cuDNN wants q, k and v split alike: not so when kv heads fewer than q's are replicated beside them.
        cudnn_ok = not (self.kv_replicated() and kv[0].shape[2] < q_BSNH.shape[2])
        out_BSNH = attend(
            q_BSNH,
            kv[0],
            kv[1],
            positions_BS,
            k_pos_BT,
            k_valid_BT,
            self.causal,
            mask_BST,
            implementation=self.attention,
            block=self.attention_block,
            cudnn_ok=cudnn_ok,
        )
        return self.project_out(out_BSNH)

    def project_out(self, out_BSNH):
        """The heads' outputs through the row-parallel output projection (Megatron's all-reduce), [B, S, D]."""
        out_BSNH = constrain(out_BSNH, HEADS, self.layout)
        return constrain(self.o(out_BSNH), RESIDUAL, self.layout)


class MLP(nnx.Module):
    """SwiGLU: gate and up column-parallel over `mlp` (separate weights, never a fused split), down row-parallel."""

    def __init__(
        self,
        cfg: ModelConfig | None = None,
        layout: Layout | None = None,
        rngs: nnx.Rngs | None = None,
        **dims,
    ):
        cfg, rngs = layer_config(cfg, dims), _need(rngs, "MLP")
        D, F = cfg.d_model, cfg.d_ff
        self.layout = layer_layout(layout, cfg)
        linear = functools.partial(Linear, cfg=cfg, rngs=rngs, layout=self.layout)
        self.gate = linear("bsd,df->bsf", (D, F), ("embed", "mlp"), std=cfg.init_std)
        self.up = linear("bsd,df->bsf", (D, F), ("embed", "mlp"), std=cfg.init_std)
        self.down = linear(
            "bsf,fd->bsd", (F, D), ("mlp", "embed"), std=cfg.init_std / math.sqrt(2 * cfg.n_layers)
        )

    def __call__(self, x_BSD):
        x_BSD = constrain(x_BSD, BLOCK_IN, self.layout)
        # Separate matmuls, though the backward then all-reduces two [B, S, D] input-gradients: stacking
        # gate and up as q/k/v are costs more in [B, S, 2, F] copies than it saves, since F >> D (measured on
        # XLA:CPU: docs/planner.md).
        gate_BSF, up_BSF = self.gate(x_BSD), self.up(x_BSD)
        h_BSF = constrain(jax.nn.silu(gate_BSF) * up_BSF, HIDDEN, self.layout)
        return constrain(self.down(h_BSF), RESIDUAL, self.layout)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). causal=False: an encoder block."""

    def __init__(
        self,
        cfg: ModelConfig | None = None,
        layout: Layout | None = None,
        rngs: nnx.Rngs | None = None,
        *,
        causal: bool = True,
        **dims,
    ):
        cfg, rngs = layer_config(cfg, dims), _need(rngs, "Block")
        self.layout = layout = layer_layout(layout, cfg)
        self.attn_norm = RMSNorm(cfg, layout)
        self.attn = Attention(cfg, layout, rngs, causal=causal)
        self.mlp_norm = RMSNorm(cfg, layout)
        self.mlp = MLP(cfg, layout, rngs)

    def __call__(self, x_BSD, positions_BS=None, **attn_kwargs):
        """`attn_kwargs`: Attention's (e.g. mask_BST)."""
        attend_self = lambda attn, h_BSD: (attn(h_BSD, positions_BS, **attn_kwargs), None)
        return self.forward(x_BSD, attend_self)[0]

    def forward(self, x_BSD, attend):
        """The block with `attend(self.attn, normed x_BSD) -> (out_BSD, aux)` as its attention; returns
        (x_BSD, aux). One body for the plain call and for generation's KV-cached walk (whose attention
        reads and writes caches and returns them as aux)."""
        out_BSD, aux = attend(self.attn, self.attn_norm(x_BSD))
        x_BSD = constrain(x_BSD + out_BSD, RESIDUAL, self.layout)
        x_BSD = x_BSD + self.mlp(self.mlp_norm(x_BSD))
        return constrain(x_BSD, RESIDUAL, self.layout), aux


class Embed(nnx.Module):
    """Vocab-parallel embedding table (V, D), rows split over the vocab axis."""

    def __init__(
        self,
        cfg: ModelConfig | None = None,
        padded_vocab: int | None = None,
        layout: Layout | None = None,
        *,
        rngs: nnx.Rngs,
        **dims,
    ):
        cfg = layer_config(cfg, dims)
        self.layout = layer_layout(layout, cfg)
        self.compute_dtype = to_dtype(cfg.compute_dtype)
        self.table_names = ("vocab", "embed")
        if padded_vocab is None:  # rows padded to a multiple of the vocab split, as the Transformer does
            padded_vocab = cfg.padded_vocab(1 if self.layout is None else self.layout.split_of("vocab"))
        with placing(self.layout):
            self.table = normal_param(
                rngs, (padded_vocab, cfg.d_model), self.table_names, cfg.init_std, to_dtype(cfg.param_dtype)
            )
        self.quant_mode: str | None = None  # "int8" or "w8a8" once quantized
        self.scale: int8.Int8Scale | None = nnx.data(None)  # the int8 table's scale, one per vocab row

    def __call__(self, tokens_BS):
        # FSDP: gather whole rows before the lookup (XLA:CPU cannot partition a gather whose rows are split
        # over the axis that also splits its indices' batch: it would replicate and re-partition).
        table_VD = gathered(self.table[...], self.table_names, self.layout)
        if self.quant_mode is not None:
            x_BSD = int8.int8_take(table_VD, self.scale[...], tokens_BS, self.compute_dtype)
        else:
            x_BSD = jnp.take(table_VD, tokens_BS, axis=0).astype(self.compute_dtype)
        # Reduce the vocab-parallel partial rows on every position, then lay the stream out as RESIDUAL.
        return constrain(constrain(x_BSD, BLOCK_IN, self.layout), RESIDUAL, self.layout)

    def attend(self, x_BSD):
        """The tied head: logits [B, S, V] = x . table^T, vocab-parallel like the table (no gather of V).
        An int8 table's per-row scale is exactly the head's per-output-channel scale."""
        table_VD = gathered(self.table[...], self.table_names, self.layout)
        if self.quant_mode is not None:
            return int8.quantized_einsum(
                self.quant_mode, "bsd,vd->bsv", x_BSD, table_VD, self.scale[...], self.compute_dtype
            )
        return jnp.einsum(
            "bsd,vd->bsv", x_BSD.astype(self.compute_dtype), table_VD.astype(self.compute_dtype)
        )

    def set_precision(self, precision: str) -> None:
        """jaxtp.quant.cast's hook, as Linear's: the table quantizes with one scale per vocab row."""
        if precision not in int8.MODES:
            self.compute_dtype = to_dtype(precision)
            return
        if self.quant_mode is None:
            self.table, self.scale = int8.quantize_variable(self.table, (1,))
        self.quant_mode = precision
