"""examples/generate.py on the CPU: the decode loop's logits equal the full forward's."""

from __future__ import annotations

import importlib.util
import pathlib
import zlib

import pytest

torch = pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    path = ROOT / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decode_logits_equal_the_full_forward(request):
    g = _load()
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    model = g.DecoderLM(vocab_size=32, dim=16, depth=2, attn_every=2, attn_heads=2, head_dim=4,
                        block_len=4).double()  # fmt: skip
    prompt = torch.randint(32, (2, 6))
    tokens, step_logits, _ = g.generate(model, prompt, 9, graph=False)
    assert tokens.shape == (2, 15) and torch.equal(tokens[:, :6], prompt)
    with torch.no_grad():
        full = model(tokens[:, :-1])[:, 5:]  # the logits that chose tokens 6..14
    torch.testing.assert_close(step_logits, full, rtol=1e-10, atol=1e-10)
    assert torch.equal(step_logits.argmax(-1), tokens[:, 6:])  # greedy


def test_main_runs_on_the_cpu(capsys):
    _load().main(["--device", "cpu", "--dim", "32", "--depth", "2", "--vocab", "40",
                  "--prompt-len", "5", "--new-tokens", "4", "--batch", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert "tokens/s" in out and "eager, cpu" in out
