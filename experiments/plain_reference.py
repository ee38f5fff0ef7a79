"""A plain pure-JAX Megatron train step - no jaxtp, no Flax - for bench.py to time beside jaxtp's.

What pure tensor parallelism costs on a machine (8 fake CPU devices on 2 cores pay every collective as
a thread rendezvous) is a property of the machine, not of jaxtp; this textbook step, timed in the same
run and the same rounds, says how much of a mesh's overhead any implementation pays there. It is the
model of jaxtp.ModelConfig written the obvious way: 2-D weights with Megatron's shardings given to
jit (q/k/v and gate/up column-parallel, out/down row-parallel, embedding and head split over the
vocab; kv heads that the model axis does not divide are replicated), RoPE, RMSNorm, SwiGLU, causal GQA,
cross-entropy on the vocab-split logits, and global-norm clipping + AdamW with the hyperparameters of
jaxtp.train.TrainConfig (a constant learning rate, weight decay on every leaf: the same work per step as
jaxtp's schedule and mask). Parameters start from a different random draw than jaxtp's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def rms_norm(x, scale, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x_BSNH, theta):
    S, H = x_BSNH.shape[1], x_BSNH.shape[-1]
    angle_SH = np.arange(S)[:, None] * theta ** (-np.arange(0, H // 2) * 2.0 / H)
    sin, cos = jnp.sin(angle_SH)[:, None], jnp.cos(angle_SH)[:, None]
    x1, x2 = x_BSNH[..., : H // 2], x_BSNH[..., H // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def param_specs(cfg, model_size: int) -> dict:
    kv = "model" if cfg.n_kv_heads % model_size == 0 else None
    layer = dict(
        norm1=P(),
        norm2=P(),
        wq=P(None, "model"),
        wk=P(None, kv),
        wv=P(None, kv),
        wo=P("model", None),
        wg=P(None, "model"),
        wu=P(None, "model"),
        wd=P("model", None),
    )
    return dict(embed=P("model", None), head=P(None, "model"), norm=P(), layers=[layer] * cfg.n_layers)


def init_params(cfg, key) -> dict:
    D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    keys = iter(jax.random.split(key, 2 + 7 * cfg.n_layers))
    normal = lambda *shape: cfg.init_std * jax.random.normal(next(keys), shape)
    layers = [
        dict(
            norm1=jnp.ones(D),
            norm2=jnp.ones(D),
            wq=normal(D, N * H),
            wk=normal(D, K * H),
            wv=normal(D, K * H),
            wo=normal(N * H, D),
            wg=normal(D, F),
            wu=normal(D, F),
            wd=normal(F, D),
        )
        for _ in range(cfg.n_layers)
    ]
    return dict(embed=normal(V, D), head=normal(D, V), norm=jnp.ones(D), layers=layers)


def loss_fn(cfg, params, tokens_BS1):
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    inputs_BS, targets_BS = tokens_BS1[:, :-1], tokens_BS1[:, 1:]
    x_BSD = params["embed"][inputs_BS]
    B, S, D = x_BSD.shape
    causal_SS = np.tril(np.ones((S, S), bool))
    for p in params["layers"]:
        h = rms_norm(x_BSD, p["norm1"], cfg.norm_eps)
        q = rope((h @ p["wq"]).reshape(B, S, N, H), cfg.rope_theta)
        k = jnp.repeat(rope((h @ p["wk"]).reshape(B, S, K, H), cfg.rope_theta), N // K, axis=2)
        v = jnp.repeat((h @ p["wv"]).reshape(B, S, K, H), N // K, axis=2)
        scores = jnp.einsum("bsnh,btnh->bnst", q, k) / math.sqrt(H)
        probs = jax.nn.softmax(jnp.where(causal_SS, scores, -1e30), axis=-1)
        x_BSD = x_BSD + jnp.einsum("bnst,btnh->bsnh", probs, v).reshape(B, S, N * H) @ p["wo"]
        h = rms_norm(x_BSD, p["norm2"], cfg.norm_eps)
        x_BSD = x_BSD + (jax.nn.silu(h @ p["wg"]) * (h @ p["wu"])) @ p["wd"]
    logits_BSV = rms_norm(x_BSD, params["norm"], cfg.norm_eps) @ params["head"]
    return optax.softmax_cross_entropy_with_integer_labels(logits_BSV, targets_BS).mean()


class PlainTrainer:
    """The same interface bench.py times jaxtp.train.Trainer through: train_step(tokens) -> metrics,
    params, opt_state, step_fn(params, opt_state, tokens) and step."""

    def __init__(self, cfg, mesh, lr=3e-3, weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95, seed=0):
        if cfg.vocab_size % mesh.shape["model"]:
            raise ValueError(
                f"plain reference: vocab_size={cfg.vocab_size} does not split over model axis {mesh.shape['model']}"
            )
        specs = param_specs(cfg, mesh.shape["model"])
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
        self.tx = optax.chain(
            optax.clip_by_global_norm(clip_norm), optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay)
        )
        self.params = jax.jit(lambda: init_params(cfg, jax.random.key(seed)), out_shardings=shardings)()
        replicate = lambda x: (
            x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, NamedSharding(mesh, P()))
        )
        self.opt_state = jax.tree.map(
            replicate, jax.jit(self.tx.init)(self.params)
        )  # step counters: replicated
        self.step = 0

        def step(params, opt_state, tokens_BS1):
            loss, grads = jax.value_and_grad(lambda p: loss_fn(cfg, p, tokens_BS1))(params)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, {"loss": loss}

        opt_shardings = jax.tree.map(lambda x: x.sharding, self.opt_state)
        self.step_fn = jax.jit(step, donate_argnums=(0, 1), out_shardings=(shardings, opt_shardings, None))

    def train_step(self, tokens_BS1) -> dict:
        self.params, self.opt_state, metrics = self.step_fn(self.params, self.opt_state, tokens_BS1)
        self.step += 1
        return metrics
