"""Tiny Hugging Face checkpoints built with transformers itself (no network), one per supported variant.

    python experiments/hf_tiny.py llama32 /tmp/tiny-llama   # then: experiments/generate.py --hf /tmp/tiny-llama ...

The tests use them as an implementation we did not write; they also let anyone try the --hf commands offline.

Each has 8 query heads (so 1x8 splits them), head_dim 8 or 16, two layers and random weights drawn with a
large initializer range, so the next-token distribution is peaked and greedy decoding is not decided by
float noise. Norm scales and biases get random offsets, so a mapping mistake there cannot hide behind ones
and zeros. `with_tokenizer` adds a byte-level BPE tokenizer trained on a few lines (vocab below the model's).
"""

from __future__ import annotations

import json
import pathlib

VOCAB = 320
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
    "rope_theta": 500000.0,
}
# name -> (config class, model class, config overrides)
VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "llama32": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE},
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}
TEXT = (
    "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
    "Tensor parallelism splits every weight over the model axis. "
) * 4


def make_all(root) -> dict:
    """{variant: (directory, torch model)} for every variant, under `root`."""
    root = pathlib.Path(root)
    return {kind: (root / kind, make_checkpoint(kind, root / kind)) for kind in VARIANTS}


def make_checkpoint(kind: str, directory, *, seed: int = 0, with_tokenizer: bool = False, dtype=None):
    """Save a random `kind` model with transformers into `directory`; return the torch model (eval mode)."""
    import torch
    import transformers

    config_cls, model_cls, overrides = VARIANTS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory)
    if with_tokenizer:
        write_tokenizer(directory)
    return model


def write_tokenizer(directory) -> None:
    """A byte-level BPE tokenizer.json (BOS prepended, as Llama 3's) plus tokenizer_config.json with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory = pathlib.Path(directory)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(directory / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "chat_template": template,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "clean_up_tokenization_spaces": False,
            }
        )
    )


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=sorted(VARIANTS))
    p.add_argument("out", help="directory to create (refused if it holds files)")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} already holds files; pick a new directory")
    make_checkpoint(args.kind, out, with_tokenizer=True)
    print(f"wrote a random {VARIANTS[args.kind][1]} with a tokenizer to {out}")
