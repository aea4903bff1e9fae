"""moe_routes/tinymoe.py: checkpoints that every pin's transformers reads the same (pure JSON, no torch).

The loads themselves (a transformers-5 checkpoint under 4.57 and vLLM 0.15.1, a 4.57 one under 5.x and vLLM
0.32.0: same config values, tokens and greedy output) were checked by hand, see portable_checkpoint."""

from __future__ import annotations

import json

import pytest

from moe_routes import tinymoe

pytestmark = pytest.mark.fast

# what transformers 5.19 writes for tinymoe's gpt_oss and qwen3_moe (the keys that matter)
TF5_TOKENIZER = {"backend": "tokenizers", "bos_token": "<s>", "tokenizer_class": "TokenizersBackend"}
TF5_YARN = {
    "model_type": "gpt_oss",
    "num_local_experts": 8,
    "rope_parameters": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_theta": 150000.0,
        "rope_type": "yarn",
        "truncate": False,
    },
}
TF5_QWEN3 = {
    "model_type": "qwen3_moe",
    "num_local_experts": 8,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
}
TF5_GLM = {
    "model_type": "glm4_moe",
    "partial_rotary_factor": 0.5,
    "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_type": "default"},
}
# what transformers 4.57 writes (left alone)
TF4_QWEN3 = {"model_type": "qwen3_moe", "num_experts": 8, "rope_scaling": None, "rope_theta": 10000.0}
TF4_TOKENIZER = {"bos_token": "<s>", "tokenizer_class": "PreTrainedTokenizerFast"}


def _write(d, config, tokenizer):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return d


def _read(d, name):
    return json.loads((d / name).read_text())


def test_a_transformers_5_checkpoint_gets_the_keys_4_57_reads(tmp_path):
    d = _write(tmp_path / "gpt_oss", TF5_YARN, TF5_TOKENIZER)
    assert tinymoe.portable_checkpoint(d) == ["tokenizer_config.json", "config.json"]
    assert _read(d, "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    cfg = _read(d, "config.json")
    assert cfg["rope_parameters"] == TF5_YARN["rope_parameters"]  # what 5.x reads is unchanged
    assert cfg["rope_theta"] == 150000.0
    legacy = dict(TF5_YARN["rope_parameters"])
    del legacy["rope_theta"]
    assert cfg["rope_scaling"] == legacy  # 5.x: a non-null rope_scaling wins, rope_theta goes back into it
    assert "num_experts" not in cfg  # gpt-oss is num_local_experts in both versions
    assert tinymoe.portable_checkpoint(d) == []  # idempotent


def test_renamed_keys_and_default_rope(tmp_path):
    d = _write(tmp_path / "qwen3", TF5_QWEN3, TF5_TOKENIZER)
    tinymoe.portable_checkpoint(d)
    cfg = _read(d, "config.json")
    assert cfg["num_experts"] == cfg["num_local_experts"] == 8  # 4.57 would build its default 128 experts
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None
    d = _write(tmp_path / "glm", TF5_GLM, TF5_TOKENIZER)
    tinymoe.portable_checkpoint(d)
    cfg = _read(d, "config.json")
    assert cfg["partial_rotary_factor"] == 0.5 and cfg["rope_scaling"] is None and cfg["rope_theta"] == 10000.0


def test_a_transformers_4_checkpoint_is_left_byte_identical(tmp_path):
    d = _write(tmp_path / "q", TF4_QWEN3, TF4_TOKENIZER)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert tinymoe.portable_checkpoint(d) == []
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_build_fixes_a_reused_directory_without_importing_torch(tmp_path, monkeypatch):
    """A directory an older tinymoe wrote under transformers 5 (stamp matches) is made portable in place, not
    rebuilt: build() returns before importing torch (this test runs in the dev venv, which has none)."""
    import builtins

    d = _write(tmp_path / "m", TF5_QWEN3, TF5_TOKENIZER)
    spec = dict(arch="qwen3_moe", hidden=128, layers=3, experts=8, top_k=2, heads=2, moe_inter=64, vocab=512)
    (d / "tinymoe.json").write_text(json.dumps({**spec, "max_pos": 4096, "seed": 0}))
    real_import = builtins.__import__

    def no_torch(name, *a, **kw):
        if name.split(".")[0] in ("torch", "transformers"):
            raise AssertionError(f"build() imported {name} for a complete directory")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert tinymoe.build("qwen3_moe", d) == d
    monkeypatch.undo()
    assert _read(d, "config.json")["num_experts"] == 8
    assert _read(d, "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
