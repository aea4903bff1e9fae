"""The HF reference routing (tests/routes_ref.py), which the engine tests compare vLLM's routing with, checked
on every tiny model family against two things it does not share code with:

* an independent calculation: the router input taken at a different module (the decoder layer's
  post_attention_layernorm output), the router weights read from model.safetensors (not from the model's
  modules), the published rule of each family written again in float64 numpy from config.json;
* HF's own routing: what the router module returns in the forward pass (transformers 5: logits, weights and
  ids in every family; 4.57: the logits of an nn.Linear gate, GLM-4.5's ids and weights, gpt-oss's dense scores
  and ids).

Needs torch and the pin's transformers (4.57 with vLLM 0.15.1, 5.x with 0.32.0), no vLLM: runs in each pin's
engine venv, seconds per family.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from routes_ref import gsm8k_questions, reference_routing, router_modules

from moe_routes import tinymoe
from moe_routes.routed_experts import moe_layer_indices

# the router's tensors in the checkpoint (both transformers versions save these names)
ROUTER_PREFIX = {"mixtral": "block_sparse_moe.gate", "gpt_oss": "mlp.router"}


def _router_tensors(model_dir, layer: int, model_type: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    prefix = f"model.layers.{layer}.{ROUTER_PREFIX.get(model_type, 'mlp.gate')}."
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update({k[len(prefix) :]: v for k, v in load_file(f).items() if k.startswith(prefix)})
    assert "weight" in tensors, (model_dir, prefix, sorted(tensors))
    return {k: v.astype(np.float64) for k, v in tensors.items()}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def independent_rule(cfg: dict, logits: np.ndarray, tensors: dict) -> tuple[np.ndarray, np.ndarray]:
    """Each family's routing from its published definition, in numpy float64; logits [T, E] -> ids, weights [T, K]."""
    mt, k = cfg["model_type"], cfg["num_experts_per_tok"]
    if mt == "gpt_oss":  # top-k of the logits, softmax over those k
        ids = _topk(logits, k)
        return ids, _softmax(np.take_along_axis(logits, ids, -1))
    if mt in ("qwen2_moe", "qwen3_moe", "mixtral"):  # softmax over all experts, top-k, renormalised or not
        p = _softmax(logits)
        ids = _topk(p, k)
        w = np.take_along_axis(p, ids, -1)
        if mt == "mixtral" or cfg["norm_topk_prob"]:
            w = w / w.sum(-1, keepdims=True)
        return ids, w
    if mt == "glm4_moe":  # DeepSeek-V3: sigmoid, bias-corrected choice within the best groups, scaled
        s = 1.0 / (1.0 + np.exp(-logits))
        biased = s + tensors["e_score_correction_bias"]
        t, e = biased.shape
        g = cfg["n_group"]
        grouped = biased.reshape(t, g, e // g)
        group_score = np.sort(grouped, -1)[..., -2:].sum(-1)
        keep = _topk(group_score, cfg["topk_group"])
        allowed = np.zeros((t, g), bool)
        np.put_along_axis(allowed, keep, True, -1)
        ids = _topk(np.where(np.repeat(allowed, e // g, -1), biased, -np.inf), k)
        w = np.take_along_axis(s, ids, -1)
        if cfg["norm_topk_prob"]:
            w = w / w.sum(-1, keepdims=True)
        return ids, w * cfg["routed_scaling_factor"]
    raise NotImplementedError(mt)


def _hf_own(out) -> dict:
    """What a router module returned, by transformers version: {"logits"} and/or {"ids", "weights"}."""
    import torch

    if torch.is_tensor(out):  # 4.57 nn.Linear gate (Qwen2/Qwen3-MoE, Mixtral)
        return {"logits": out}
    if len(out) == 3:  # 5.x *TopKRouter: (logits, top-k weights, top-k ids)
        return {"logits": out[0], "weights": out[1], "ids": out[2]}
    a, b = out
    if not a.is_floating_point():  # 4.57 GLM-4.5 TopkRouter: (ids, weights)
        return {"ids": a, "weights": b}
    return {"ids": b, "weights": a.gather(1, b)}  # 4.57 gpt-oss: (dense scores [T, E], ids)


def _sorted(ids: np.ndarray, w: np.ndarray):
    order = np.argsort(ids, -1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(w, order, -1)


@pytest.mark.parametrize("arch", tinymoe.ARCHS)
def test_reference_routing_equals_an_independent_calculation_and_hf_itself(models, arch):
    import torch
    import transformers as tf

    model_dir = models[arch]
    cfg = json.loads((model_dir / "config.json").read_text())
    layers = moe_layer_indices(cfg)
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    seqs = [tok(q)["input_ids"] for q in gsm8k_questions(2)]
    seqs[1] = seqs[1] * 3  # a longer second sequence: positions past the first one's length
    ref = reference_routing(model_dir, seqs, layers)

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert sorted(router_modules(model)) == layers, "the reference's routers are not the config's MoE layers"
    decoder = model.model.layers
    normed, own = {}, {}
    hooks = [
        decoder[layer].post_attention_layernorm.register_forward_hook(
            lambda m, a, o, layer=layer: normed.__setitem__(layer, o.detach().reshape(-1, o.shape[-1]))
        )
        for layer in layers
    ] + [
        router_modules(model)[layer].register_forward_hook(
            lambda m, a, o, layer=layer: own.__setitem__(layer, _hf_own(o))
        )
        for layer in layers
    ]
    tensors = {layer: _router_tensors(model_dir, layer, cfg["model_type"]) for layer in layers}
    checked = 0
    try:
        for seq, (ref_ids, ref_w) in zip(seqs, ref, strict=True):
            assert ref_ids.shape == ref_w.shape == (len(seq), len(layers), cfg["num_experts_per_tok"])
            with torch.no_grad():
                model(torch.tensor([seq]))
            for j, layer in enumerate(layers):
                x = normed[layer].double().numpy()
                t = tensors[layer]
                logits = x @ t["weight"].T + t.get("bias", 0.0)
                ids, w = _sorted(*independent_rule(cfg, logits, t))
                r_ids, r_w = _sorted(ref_ids[:, j].astype(np.int64), ref_w[:, j].astype(np.float64))
                np.testing.assert_array_equal(r_ids, ids, err_msg=f"{arch} layer {layer}: expert ids")
                np.testing.assert_allclose(r_w, w, rtol=0, atol=1e-5, err_msg=f"{arch} layer {layer}: weights")
                hf = own[layer]
                if "logits" in hf:
                    np.testing.assert_allclose(hf["logits"].double().numpy(), logits, rtol=1e-5, atol=1e-4)
                if "ids" in hf:
                    h_ids, h_w = _sorted(hf["ids"].numpy().astype(np.int64), hf["weights"].double().numpy())
                    np.testing.assert_array_equal(r_ids, h_ids, err_msg=f"{arch} layer {layer}: HF's own ids")
                    np.testing.assert_allclose(r_w, h_w, rtol=0, atol=1e-6, err_msg=f"{arch} layer {layer}: HF's own")
                checked += ids.size
    finally:
        for h in hooks:
            h.remove()
    assert checked == sum(len(s) for s in seqs) * len(layers) * cfg["num_experts_per_tok"]
