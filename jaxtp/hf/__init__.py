"""Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3 and their fine-tunes) in and out of jaxtp.

cfg = jaxtp.hf.config(path)                       # config.json -> ModelConfig (plan without weights)
model = jaxtp.hf.load(path, mesh, precision="bf16")  # safetensors streamed shard by shard onto the mesh
tok = jaxtp.hf.tokenizer(path)                    # tokenizer.json + chat template (sandboxed jinja2)
jaxtp.hf.save(model, out, tokenizer=tok)          # config.json + safetensors that transformers loads
"""

from .config import ARCHITECTURES, config
from .files import CheckpointError
from .load import load
from .save import save
from .tokenizer import Tokenizer, tokenizer

__all__ = ["ARCHITECTURES", "CheckpointError", "Tokenizer", "config", "load", "save", "tokenizer"]
