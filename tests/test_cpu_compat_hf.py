"""The CPU compatibility layer must not change what Hugging Face models compute in the same process.

Regression: wrapping torch.tensor & co. before torch cached its set of device-aware factories made
HF loading under `with torch.device(...)` build some buffers on the wrong device, so the embedded
engines computed with uninitialised values after the learner was set up.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    path, install = sys.argv[1], sys.argv[2] == "1"
    if install:
        from uniopd_mcore.learner import cpu_compat
        cpu_compat.install()
    model = Qwen3ForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 2]])
    with torch.no_grad():
        print(repr(model(ids).logits.double().sum().item()))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the compatibility layer is inactive with CUDA")
def test_hf_model_computes_the_same_after_install(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "m")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)

    def logits_sum(install: str) -> str:
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "m"), install],
                             capture_output=True, text=True, timeout=300, check=True)
        return out.stdout.strip().splitlines()[-1]

    assert logits_sum("1") == logits_sum("0")
