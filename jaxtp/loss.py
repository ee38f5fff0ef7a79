"""Cross-entropy over vocab-sharded logits, without gathering the vocabulary onto one device.

logsumexp reduces over the sharded vocab axis (XLA turns it into all-reduces of [B, S] maxima and
sums) and the target logit is picked with a one-hot contraction (another [B, S] all-reduce), so only
B*S numbers cross the model axis - Megatron's fused vocab-parallel cross-entropy, from jit alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cross_entropy", "lm_loss"]


def cross_entropy(logits_BSV, targets_BS, mask_BS=None):
    """Mean negative log-likelihood in nats per token (over `mask_BS` when given)."""
    logits_BSV = logits_BSV.astype(jnp.float32)
    lse_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
    onehot_BSV = jax.nn.one_hot(targets_BS, logits_BSV.shape[-1], dtype=logits_BSV.dtype)
    target_BS = jnp.sum(logits_BSV * onehot_BSV, axis=-1)
    nll_BS = lse_BS - target_BS
    if mask_BS is None:
        return jnp.mean(nll_BS)
    mask_BS = mask_BS.astype(jnp.float32)
    return jnp.sum(nll_BS * mask_BS) / jnp.maximum(jnp.sum(mask_BS), 1.0)


def lm_loss(model, tokens_BS1):
    """Next-token loss of `model` on a [B, S+1] window: inputs are [:, :-1], targets [:, 1:]."""
    logits_BSV = model(tokens_BS1[:, :-1])
    return cross_entropy(logits_BSV, tokens_BS1[:, 1:])
