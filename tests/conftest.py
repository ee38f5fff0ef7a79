"""8 fake CPU devices, set before JAX initialises; shared tiny config and helpers.

The XLA flag is how JAX users fake devices; it must be in the environment before jax is imported.
JAX's persistent compilation cache stays off (cache hits were seen deadlocking CPU collectives).
"""

import functools
import os

# LLVM -O0 for the tests: ~25% faster XLA:CPU compiles on tiny models; HLO passes (and so the collectives
# and memory analysis the tests check) are unchanged. Subprocesses get the same flag via subprocess_env().
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE} --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import jaxtp  # noqa: E402

MESHES = ["1x1", "1x2", "2x2", "2x4", "4x2", "1x8", "8x1"]


@pytest.fixture(scope="session")
def tiny():
    return jaxtp.ModelConfig.preset("tiny")


def batch_tokens(mesh, batch=8, seq=17, seed=0):
    """A [B, S+1] token batch placed with batch over `data`."""
    tokens = np.random.default_rng(seed).integers(0, 256, size=(batch, seq), dtype=np.int32)
    return jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))


def loss_and_grads(model, tokens):
    """Jitted loss and parameter gradients of `model` on `tokens` (functional, so nothing mutates)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params, tokens):
        return jaxtp.loss.lm_loss(nnx.merge(graphdef, params, rest), tokens)

    return jax.jit(jax.value_and_grad(f))(params, tokens)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@functools.cache
def reference_losses(cfg, spec, steps=12, batch=8, seq=32, lr=3e-3) -> list:
    """What run.py computes for `--data synthetic --batch-size 8 --seq-len 32`, in-process, uninterrupted
    (cached: several tests compare against the same run)."""
    corpus = jaxtp.data.load_corpus("synthetic")
    mesh = jaxtp.make_mesh(spec)
    tr = jaxtp.train.Trainer.create(
        jaxtp.Transformer.create(cfg, mesh),
        jaxtp.train.TrainConfig(steps=steps, batch_size=batch, seq_len=seq, lr=lr),
    )
    return [
        float(tr.train_step(jaxtp.data.train_batch(corpus.train, mesh, batch, seq, 0, i))["loss"])
        for i in range(steps)
    ]


def subprocess_env() -> dict:
    """The environment for a child run.py: same compile flags, but it must fake its devices itself."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if "device_count" not in f)
    return env
