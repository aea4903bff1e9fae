"""Build tiny random-weight MoE checkpoints (HF format) plus a BPE tokenizer trained on local text.

No hub access: the architecture comes from `transformers` config classes, the tokenizer is trained with
`tokenizers` on the prompts you give it (GSM8K questions by default). Routing statistics of such a model
are meaningless; it exists to exercise the real engines end to end.

The checkpoint reads the same under the transformers of every vLLM pin's environment (4.57 for vLLM 0.15.1,
5.x for 0.32.0), whichever of them wrote it: transformers 5 writes a tokenizer class and RoPE keys 4.57 does
not know, and `portable_checkpoint` adds what 4.57 reads (a directory built once, e.g. the bench model in the
shared cache, serves every pin).

Examples:
  moe-routes tiny-model --arch qwen2_moe --out /tmp/tiny-qwen2moe
  moe-routes tiny-model --arch mixtral --out /tmp/tiny-mixtral --hidden 256 --layers 4 --experts 16
  moe-routes tiny-model --arch qwen2_moe --out /tmp/bench --hidden 512 --layers 8 --experts 32 --top-k 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_routes.prompts import SHARED_GSM8K, read_questions

ARCHS = ("qwen2_moe", "mixtral", "qwen3_moe", "glm4_moe", "gpt_oss")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: list[str], out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def make_config(
    arch: str,
    *,
    vocab: int,
    hidden: int,
    layers: int,
    experts: int,
    top_k: int,
    heads: int,
    moe_inter: int,
    max_pos: int,
):
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        dtype="float32",  # transformers >= 4.56 (`torch_dtype` is its deprecated alias)
    )
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **common,
            intermediate_size=moe_inter * 2,
            moe_intermediate_size=moe_inter,
            shared_expert_intermediate_size=moe_inter * 2,
            num_experts=experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common,
            head_dim=hidden // heads,
            intermediate_size=moe_inter * 2,
            moe_intermediate_size=moe_inter,
            num_experts=experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if arch == "mixtral":
        return tf.MixtralConfig(
            **common,
            intermediate_size=moe_inter,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            sliding_window=None,
        )
    if arch == "glm4_moe":
        # DeepSeek-V3-style routing (sigmoid scores, e_score_correction_bias, grouped top-k: the best
        # topk_group of n_group groups, renormalised, scaled) with plain GQA attention, which the vLLM CPU
        # backend runs (it has no MLA attention, so DeepSeek-V2/V3 themselves cannot run on CPU).
        return tf.Glm4MoeConfig(
            **common,
            head_dim=hidden // heads,
            partial_rotary_factor=0.5,
            intermediate_size=moe_inter * 2,
            moe_intermediate_size=moe_inter,
            n_routed_experts=experts,
            n_shared_experts=1,
            num_experts_per_tok=top_k,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            use_qk_norm=False,
        )
    if arch == "gpt_oss":
        # Sliding-window and full-attention layers alternate: a hybrid KV-cache layout (two KV-cache
        # groups). Router with bias, top-k on the logits, softmax over the k. vLLM keeps its attention
        # sinks in bfloat16, so the engine must run this model with dtype=bfloat16.
        return tf.GptOssConfig(
            **common,
            head_dim=hidden // heads,
            intermediate_size=moe_inter,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            sliding_window=128,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
        )
    raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")


def build(
    arch: str,
    out: Path,
    *,
    prompts_file: Path = SHARED_GSM8K,
    hidden: int = 128,
    layers: int = 3,
    experts: int = 8,
    top_k: int = 2,
    heads: int = 2,
    moe_inter: int = 64,
    vocab: int = 512,
    max_pos: int = 4096,
    seed: int = 0,
) -> Path:
    """Write a random-weight checkpoint + tokenizer to `out` (idempotent: reuses a complete directory)."""
    out = Path(out)
    stamp = out / "tinymoe.json"
    spec = dict(
        arch=arch,
        hidden=hidden,
        layers=layers,
        experts=experts,
        top_k=top_k,
        heads=heads,
        moe_inter=moe_inter,
        vocab=vocab,
        max_pos=max_pos,
        seed=seed,
    )
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        portable_checkpoint(out)  # a directory an older tinymoe wrote under transformers 5
        return out
    import torch
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    if not prompts_file.exists():
        raise FileNotFoundError(f"prompts file {prompts_file} not found (needed to train the tokenizer)")
    train_tokenizer(read_questions(prompts_file), out, vocab)
    cfg = make_config(
        arch,
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        experts=experts,
        top_k=top_k,
        heads=heads,
        moe_inter=moe_inter,
        max_pos=max_pos,
    )
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init gives near-uniform router logits; scale the gates so routing is decisive (ties in top-k
    # would make any reference comparison ill-posed, as in real trained models they are rare).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight")):
                p.mul_(8.0)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # exercise the bias-corrected selection
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    model.save_pretrained(out, safe_serialization=True)
    portable_checkpoint(out)
    stamp.write_text(json.dumps(spec))
    return out


# tokenizer classes transformers 5 writes that 4.x cannot load: in 5.x PreTrainedTokenizerFast is their alias
TF5_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# config keys transformers 5 renamed (its config class's attribute_map still reads the old name) that 4.57 needs,
# per model_type of ARCHS: {old name: new name}. 4.57 without `num_experts` builds Qwen3-MoE with its default
# 128 experts (the checkpoint's 8-expert gate then fails to load). Found by loading each ARCHS checkpoint of
# each version under the other: the configs then differ in no other key either version reads.
TF5_RENAMED_KEYS = {"qwen3_moe": {"num_experts": "num_local_experts"}}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def portable_checkpoint(out: Path) -> list[str]:
    """Make a checkpoint directory written by transformers 5 load the same under transformers 4.57 (vLLM 0.15.1's
    environment); a no-op on one 4.x wrote. Idempotent; returns the files it changed.

    - tokenizer_config.json: `tokenizer_class` TokenizersBackend (5.x only) -> PreTrainedTokenizerFast (both).
    - config.json: 5.x keeps RoPE in `rope_parameters` only; 4.57 reads `rope_theta` and `rope_scaling` (and
      would silently take its class defaults without them). Both are added, with the same values: 5.x prefers a
      non-null `rope_scaling` over `rope_parameters` and reads `rope_theta` into it, so it reads what it wrote.
      Keys 5.x renamed (TF5_RENAMED_KEYS) get their old name too, same value."""
    out = Path(out)
    changed = []
    tok_path = out / "tokenizer_config.json"
    if tok_path.exists():
        tok = json.loads(tok_path.read_text())
        if tok.get("tokenizer_class") in TF5_TOKENIZER_CLASSES:
            tok["tokenizer_class"] = TF5_TOKENIZER_CLASSES[tok["tokenizer_class"]]
            _write_json_atomic(tok_path, tok)
            changed.append(tok_path.name)
    cfg_path = out / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        before = dict(cfg)
        rope = cfg.get("rope_parameters")
        if isinstance(rope, dict) and "rope_type" in rope and "rope_theta" not in cfg:
            legacy = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
            cfg["rope_theta"] = rope["rope_theta"]
            cfg["rope_scaling"] = None if legacy.get("rope_type", "default") == "default" else legacy
            if "partial_rotary_factor" in rope:
                cfg.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        for old, new in TF5_RENAMED_KEYS.get(cfg.get("model_type"), {}).items():
            if new in cfg and old not in cfg:
                cfg[old] = cfg[new]
        if cfg != before:
            _write_json_atomic(cfg_path, cfg)
            changed.append(cfg_path.name)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("Examples:")[1] and "Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", choices=ARCHS, default="qwen2_moe")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--prompts-file",
        type=Path,
        default=SHARED_GSM8K,
        help="JSONL with a 'question' field, used to train the tokenizer (default: %(default)s)",
    )
    for name, default in (
        ("hidden", 128),
        ("layers", 3),
        ("experts", 8),
        ("top-k", 2),
        ("heads", 2),
        ("moe-inter", 64),
        ("vocab", 512),
        ("seed", 0),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args(argv)
    path = build(
        a.arch,
        a.out,
        prompts_file=a.prompts_file,
        hidden=a.hidden,
        layers=a.layers,
        experts=a.experts,
        top_k=a.top_k,
        heads=a.heads,
        moe_inter=a.moe_inter,
        vocab=a.vocab,
        seed=a.seed,
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
