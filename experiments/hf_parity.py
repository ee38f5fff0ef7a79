"""jaxtp.hf.load against transformers on the tiny checkpoints of hf_tiny.py: a table of logit errors per
variant and mesh, and whether 32 greedy tokens agree. The tests assert the same bounds; this prints the
numbers (JSON with --out).

    python experiments/hf_parity.py [--meshes 1x1,2x4,1x8] [--out parity.json]

Error = max |jaxtp - transformers| / max |transformers| over the real vocabulary, f32, a [2, 16] prompt.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

from hf_tiny import VARIANTS, VOCAB, make_all  # this directory is on sys.path when run as a script

import jaxtp


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meshes", default="1x1,2x4,1x8")
    p.add_argument("--out", default=None, help="write the table as JSON here too")
    args = p.parse_args(argv)
    jaxtp.use_cpu_devices(8)
    import jax
    import numpy as np
    import torch

    prompt_BS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 16)).astype(np.int32)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for kind, (directory, model) in make_all(root).items():
            with torch.no_grad():
                ref = model(torch.tensor(prompt_BS, dtype=torch.long)).logits.numpy()
                greedy = model.generate(
                    torch.tensor(prompt_BS, dtype=torch.long),
                    max_new_tokens=32,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                ).numpy()[:, prompt_BS.shape[1] :]
            for mesh in args.meshes.split(","):
                ours = jaxtp.hf.load(directory, jaxtp.make_mesh(mesh))
                logits = np.asarray(ours(jax.numpy.asarray(prompt_BS)))[..., :VOCAB]
                tokens = jaxtp.generate(ours, prompt_BS, max_new_tokens=32, temperature=0.0)
                rows.append(
                    {
                        "variant": kind,
                        "architecture": VARIANTS[kind][1],
                        "mesh": mesh,
                        "max_rel_error": float(np.max(np.abs(logits - ref)) / np.max(np.abs(ref))),
                        "greedy_32_identical": bool(np.array_equal(tokens, greedy)),
                    }
                )
                print(
                    f"{kind:8s} {mesh:4s} max rel error {rows[-1]['max_rel_error']:.2e}  "
                    f"greedy 32 identical: {rows[-1]['greedy_32_identical']}",
                    flush=True,
                )
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
