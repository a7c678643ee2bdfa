"""`uniopd-mcore export`: a learner checkpoint saved at TP=2 -> Hugging Face safetensors at TP=1
(in the CLI process) and at TP=2 (local processes started by the export); transformers reloads
them and gives the trained learner's logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist import run_distributed

REPO = Path(__file__).resolve().parents[1]
LENGTHS = [7, 12, 4]


def _seqs():
    from uniopd_mcore.learner.testing import random_sequences

    return random_sequences(LENGTHS, 100, seed=5)


def _train_and_save(rank, world, hf_dir, ckpt):
    from uniopd_mcore.data.packing import pack_sequences
    from uniopd_mcore.learner import Learner, init_distributed

    init_distributed(2, 1)
    learner = Learner.from_hf(hf_dir, lr=1e-2)
    seqs = _seqs()
    learner.sft_step([pack_sequences(seqs, loss_mask=[[1.0] * len(s) for s in seqs])])
    learner.save_checkpoint(ckpt, user_state={"step": 1})
    return learner.full_logits([pack_sequences(seqs)])[0]


def _hf_logits(rank, world, hf_dir):
    from transformers import AutoModelForCausalLM

    from uniopd_mcore.learner.testing import hf_logits

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return torch.cat(hf_logits(model, _seqs()))


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uniopd_mcore.cli", "export", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from uniopd_mcore.learner.testing import make_tiny_hf_model

    root = tmp_path_factory.mktemp("export")
    hf_dir = root / "hf"
    make_tiny_hf_model(str(hf_dir))
    ckpt_root = root / "ckpt"
    logits = run_distributed(_train_and_save, 2, args=(str(hf_dir), str(ckpt_root / "step_000001")))
    torch.testing.assert_close(logits[0], logits[1])
    (ckpt_root / "step_000002.tmp").mkdir()  # an unfinished save beside it: ignored
    return hf_dir, ckpt_root, logits[0]


@pytest.mark.parametrize("tp", [1, 2])
def test_export_reloads_with_transformers(trained, tmp_path, tp):
    hf_dir, ckpt_root, learner_logits = trained
    out = tmp_path / f"hf_tp{tp}"
    # the checkpoint root: the newest finished checkpoint in it is exported
    proc = _export(str(ckpt_root), "--hf-template", str(hf_dir), "--out", str(out), "--tp", str(tp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (tmp_path / f"hf_tp{tp}.tmp").exists()
    exported = run_distributed(_hf_logits, 1, args=(str(out),))[0]
    assert exported.shape == learner_logits.shape
    torch.testing.assert_close(exported, learner_logits, atol=1e-4, rtol=1e-4)
    # and the step changed the weights: the template's logits are different
    template = run_distributed(_hf_logits, 1, args=(str(hf_dir),))[0]
    assert (template - learner_logits).abs().max() > 1e-2


def test_export_without_checkpoint_fails(tmp_path):
    proc = _export(str(tmp_path), "--hf-template", str(tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "not a finished learner checkpoint" in proc.stderr
