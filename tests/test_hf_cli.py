"""run.py --hf (fine-tune, report, export, resume, plan) and generate.py --hf (streaming) on a tiny checkpoint.

The checkpoint is Qwen2-shaped (tied embeddings, q/k/v biases), so the report's 1-layer collective comparison
and the export see the ModelConfig switches a preset never sets. Runs are in-process (main(argv)) apart from
one subprocess that checks generate.py fakes its own devices.
"""

import json
import math
import pathlib
import random
import re
import shutil
import subprocess
import sys

import generate as generate_cli  # experiments/generate.py (pyproject's pytest pythonpath)
import numpy as np
import pytest
import run
from conftest import subprocess_env
from hf_tiny import TEXT, make_checkpoint

import jaxtp

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)
BATCH, SEQ, STEPS = 8, 32, 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2")
    make_checkpoint("qwen2", directory, with_tokenizer=True)
    return directory


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """~25 KB of lines drawn from the tokenizer's training text: ~13k tokens, 10% held out."""
    rng, words = random.Random(0), TEXT.split()
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(12)) + "\n" for _ in range(400)))
    return path


@pytest.fixture(scope="module")
def finetune(ckpt, text_file, tmp_path_factory):
    base = tmp_path_factory.mktemp("finetune")
    args = [
        "--hf",
        str(ckpt),
        "--data",
        str(text_file),
        "--mesh",
        "2x4",
        "--steps",
        str(STEPS),
        "--seq-len",
        str(SEQ),
        "--batch-size",
        str(BATCH),
        "--lr",
        "1e-2",
        "--sample-len",
        "8",
        "--checkpoint-every",
        "4",
    ]
    assert run.main([*args, "--out", str(base / "out"), "--export-hf", str(base / "export")]) == 0
    return args, base, json.loads((base / "out" / "report.json").read_text())


def heldout_windows(ckpt, text_file):
    """The report's held-out windows [W, S+1], rebuilt from the data module's functions."""
    tok = jaxtp.hf.tokenizer(ckpt)
    corpus = jaxtp.data.tokenize(jaxtp.data.load_corpus(str(text_file)), tok)
    starts = jaxtp.data.eval_starts(len(corpus.heldout), BATCH, SEQ)
    return tok, np.stack([corpus.heldout[s : s + SEQ + 1] for s in starts])


def test_finetune_lowers_heldout_loss_and_reports(finetune):
    _, _, r = finetune
    before, after = r["eval_before"]["loss"], r["eval"]["f32"]["loss"]
    assert after < before - 1.0, (before, after)
    assert len(r["loss"]) == STEPS and r["loss"][-1] < r["loss"][0]
    assert r["collectives_per_layer"]["all-reduce@model"]["count"] == 4  # the 1-layer variant compiled
    assert r["model"]["tie_embeddings"] and r["model"]["qkv_bias"]
    assert set(r["eval"]) == {"f32", "bf16", "int8", "w8a8"} and all(
        "bits_per_byte" in v for v in r["eval"].values()
    )
    assert isinstance(r["sample"], str) and r["sample"]


def test_bits_per_byte_counts_the_bytes_the_targets_cover(finetune, ckpt, text_file):
    _, _, r = finetune
    tok, windows = heldout_windows(ckpt, text_file)
    n_bytes = sum(
        len(tok.decode(w[1:]).encode("utf-8")) for w in windows
    )  # ASCII text: every span decodes whole
    f32 = r["eval"]["f32"]
    assert f32["bits_per_byte"] == pytest.approx(
        f32["loss"] * windows[:, 1:].size / math.log(2) / n_bytes, rel=1e-9
    )
    assert 1.5 < n_bytes / windows[:, 1:].size < 3  # BPE tokens here are ~2 bytes: not the byte-level formula


def test_export_loads_in_transformers_with_the_finetuned_loss(finetune, ckpt, text_file):
    import torch
    import transformers

    _, base, r = finetune
    assert r["export_hf"] == str(base / "export")
    model = transformers.AutoModelForCausalLM.from_pretrained(base / "export", dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    _, windows = heldout_windows(ckpt, text_file)
    with torch.no_grad():
        logits = model(torch.tensor(windows[:, :-1], dtype=torch.long)).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.tensor(windows[:, 1:], dtype=torch.long).reshape(-1)
    )
    assert float(loss) == pytest.approx(r["eval"]["f32"]["loss"], rel=1e-5)
    assert (base / "export" / "tokenizer.json").is_file()


def test_resume_continues_the_finetune_bit_identically(finetune, tmp_path):
    args, base, r = finetune
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    shutil.rmtree(out / "checkpoints" / str(STEPS))  # as if killed between the step-4 and step-8 checkpoints
    assert run.main([*args, "--out", str(out), "--resume", "--lean"]) == 0
    assert json.loads((out / "report.json").read_text())["loss"] == r["loss"]


def test_plan_from_config_json_alone(ckpt, tmp_path, capsys):
    shutil.copyfile(ckpt / "config.json", tmp_path / "config.json")
    assert run.main(["--plan", "--hf", str(tmp_path), "--mesh", "2x4", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "D=64, L=2, N=8, K=4, F=128, V=320" in out and "batch 4 x seq 128" in out


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--export-hf", "EXISTING"], "already exists and is not empty"),
        (["--seq-len", "129"], "outside 1..128"),
        (["--hf", "MISSING"], "no checkpoint directory"),
    ],
)
def test_run_hf_bad_input_is_refused_before_training(ckpt, tmp_path, capsys, extra, fragment):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    extra = [{"EXISTING": str(existing), "MISSING": str(tmp_path / "missing")}.get(a, a) for a in extra]
    assert run.main(["--hf", str(ckpt), "--data", "synthetic", "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_export_needs_hf(tmp_path, capsys):
    assert (
        run.main(["--model", "tiny", "--export-hf", str(tmp_path / "x"), "--out", str(tmp_path / "out")]) == 2
    )
    assert "--export-hf needs --hf" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_generate_streams_what_jaxtp_generate_returns(finetune, capsys):
    _, base, _ = finetune
    export = base / "export"
    argv = [
        "--hf",
        str(export),
        "--mesh",
        "1x8",
        "--precision",
        "int8",
        "--prompt",
        "The quick brown fox",
        "--chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
    ]
    assert generate_cli.main(argv) == 0
    out = capsys.readouterr().out
    streamed = out.split(generate_cli.RULE + "\n", 1)[1].rsplit("\n" + generate_cli.RULE, 1)[0]
    for pattern in (
        r"^prefill: \d+ tokens in .* tokens/s$",
        r"^decode: \d+ tokens in .* tokens/s ",
        r"^KV cache: [\d.,]+ [KMG]?i?B per device",
    ):
        assert re.search(pattern, out, re.M), pattern

    tok = jaxtp.hf.tokenizer(export)
    ids = tok.apply_chat_template([{"role": "user", "content": "The quick brown fox"}], tokenize=True)
    assert ids[0] == tok.bos_token_id and ids == tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "The quick brown fox"}]),
        add_special_tokens=False,
    )  # BOS once, from the template
    model = jaxtp.hf.load(export, jaxtp.make_mesh("1x8"), precision="int8")
    seen = []  # on_token sees every token as it is sampled (generation may stop early after eos: then fewer)
    out_BT = jaxtp.generate(
        model, np.asarray([ids]), 24, temperature=0, eos_id=tok.eos_token_ids, on_token=seen.append
    )
    assert np.array_equal(np.stack(seen, axis=1), out_BT[:, : len(seen)])
    assert np.all(out_BT[:, len(seen) :] == tok.eos_token_id)
    expected = out_BT[0].tolist()
    expected = expected[: expected.index(tok.eos_token_id)] if tok.eos_token_id in expected else expected
    assert expected, "the greedy continuation is empty: nothing was streamed"
    assert streamed == tok.decode(expected, skip_special_tokens=True)

    args = generate_cli.parse_args(argv)
    tokens, stats = generate_cli.sample(model, tok, ids, 24, args, len(ids) + 24, lambda text: None)
    assert tokens == expected and stats["prefill_tokens"] == len(ids)


@pytest.fixture
def bad_checkpoints(ckpt, tmp_path):
    """Checkpoint directories that generate.py must refuse: name -> path."""
    dirs = {"missing": tmp_path / "missing"}
    for name in ("no_config", "no_weights", "gpt2"):
        shutil.copytree(ckpt, tmp_path / name)
        dirs[name] = tmp_path / name
    (dirs["no_config"] / "config.json").unlink()
    (dirs["no_weights"] / "model.safetensors").unlink()
    config = json.loads((ckpt / "config.json").read_text())
    (dirs["gpt2"] / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    return dirs


@pytest.mark.parametrize(
    "name,extra,fragment",
    [
        ("missing", [], "no checkpoint directory"),
        ("no_config", [], "has no config.json"),
        ("no_weights", [], "has no weights"),
        ("gpt2", [], "'GPT2LMHeadModel' is not supported"),
        ("ok", ["--prompt", "word " * 200], "no room to generate"),
        ("ok", ["--max-new-tokens", "0"], "--max-new-tokens must be a positive"),
        ("ok", ["--top-p", "1.5"], "top_p must be in (0, 1]"),
    ],
)
def test_generate_bad_input(ckpt, bad_checkpoints, tmp_path, capsys, name, extra, fragment):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    hf = bad_checkpoints.get(name, ckpt)
    assert generate_cli.main(["--hf", str(hf), "--prompt", "hi", *extra]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert captured.out == "" and sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_generate_internal_error_keeps_its_traceback(ckpt, monkeypatch, capsys):
    """A ValueError from inside the library (not a check of the user's input) is a bug: it propagates."""

    def bug(*args, **kwargs):
        raise ValueError("an internal error")

    monkeypatch.setattr(jaxtp.hf, "load", bug)
    with pytest.raises(ValueError, match="an internal error"):
        generate_cli.main(["--hf", str(ckpt), "--prompt", "hi"])
    assert "error:" not in capsys.readouterr().err


def test_generate_fakes_devices_and_names_the_meshes_that_work(ckpt):
    """A real process (no device flag from conftest): 1x3 needs 3 of the 8 faked CPU devices, then the heads check."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "generate.py"),
            "--hf",
            str(ckpt),
            "--mesh",
            "1x3",
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip()
    assert err.startswith("error: n_heads=8") and "meshes that work" in err and len(err.splitlines()) == 1, (
        err
    )
