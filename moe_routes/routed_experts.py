"""Client side of vLLM's "routed experts" output (patched vLLM 0.15.1, same layout as upstream vLLM 0.22+).

stdlib + numpy only (the ``openai`` client is optional: its objects are read like dicts). Nothing here
imports vLLM.

What the engine returns, per finished completion (P prompt tokens, G generated tokens, S = the
``routed_experts_prompt_start`` of the request, default 0):

* ``routed_experts``: ids ``[P+G-1-S, L, K]``, uint8 when the model has <= 256 routed experts, else uint16;
  logical expert ids. Row r is token position S + r (the last sampled token never enters the model, so it
  has no row). L = **every** decoder layer (``hf_config.num_hidden_layers``): the rows of dense (non-MoE)
  layers are 0, exactly like expert 0, so use :func:`moe_layer_indices` to know which layers to read.
  K = top_k.
* ``routed_expert_weights`` (engine arg ``enable_return_routed_expert_weights``): float32, same shape, the
  weights the expert kernel applied; 0.0 on dense layers.

Offline (``vllm.LLM``)::

    from vllm import LLM, SamplingParams
    from moe_routes.routed_experts import RoutedExperts, moe_layer_indices, moe_rows

    llm = LLM(model, enable_return_routed_experts=True, enable_return_routed_expert_weights=True)
    out = llm.generate(["Hello"], SamplingParams(max_tokens=16, routed_experts_prompt_start=0))[0]
    r = RoutedExperts.from_completion_output(out.outputs[0])   # r.ids [T, L, K], r.weights, r.prompt_start
    layers = moe_layer_indices(llm.llm_engine.model_config.hf_config)
    ids_moe = moe_rows(r.ids, layers)                          # [T, len(layers), K]

OpenAI server (``vllm serve MODEL --enable-return-routed-experts [--enable-return-routed-expert-weights]``)::

    import openai
    from moe_routes.routed_experts import from_choice

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
    resp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=16,
                                     extra_body={"routed_experts_prompt_start": 0})
    r = from_choice(resp.choices[0])        # also chat choices, the final chunk of a streamed choice,
                                            # and plain dicts from requests/httpx JSON

On the wire each choice carries ``routed_experts`` (and ``routed_expert_weights``): standard base64 of a
complete ``.npy`` file (``np.save(buf, arr, allow_pickle=False)``), plus ``routed_experts_prompt_start``.
:func:`decode_npy_b64` reads it strictly; upstream's own recipe
``np.load(io.BytesIO(base64.b64decode(s)), allow_pickle=False)`` gives the same array.

SGLang returns routing in other encodings (its own ``meta_info["routed_experts"]`` is raw int32 without a
``.npy`` header; this repository's SGLang patches return ``meta_info["expert_routing"]``): decode those with
:mod:`moe_routes.sglang_routing`.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "IDS_FIELD",
    "WEIGHTS_FIELD",
    "PROMPT_START_FIELD",
    "NPY_MAGIC",
    "RoutedExperts",
    "RoutedExpertsMissing",
    "decode_npy_b64",
    "encode_npy_b64",
    "from_choice",
    "from_response",
    "get_field",
    "moe_layer_indices",
    "moe_rows",
    "num_routed_experts",
    "routing_layout",
    "check_layer_layout",
]

IDS_FIELD = "routed_experts"
WEIGHTS_FIELD = "routed_expert_weights"
PROMPT_START_FIELD = "routed_experts_prompt_start"
NPY_MAGIC = b"\x93NUMPY"
# uint8 / uint16 from vLLM 0.22+ and this series; int32 is what upstream documents for out-of-tree platforms
ID_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int32))
WEIGHTS_DTYPE = np.dtype(np.float32)
_SERVER_HINT = "start the server with --enable-return-routed-experts (vllm serve MODEL --enable-return-routed-experts)"
_SGLANG_HINT = "for SGLang payloads use moe_routes.sglang_routing"


class RoutedExpertsMissing(ValueError):
    """The choice / completion output carries no routing (the server or engine was started without it)."""


# ------------------------------------------------------------------------------------------------
# the .npy base64 encoding
# ------------------------------------------------------------------------------------------------
def encode_npy_b64(arr: np.ndarray) -> str:
    """The server's encoding: standard base64 (with padding) of the bytes ``np.save(allow_pickle=False)`` writes."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_npy_b64(s: str | bytes, *, field: str = IDS_FIELD) -> np.ndarray:
    """Decode one ``routed_experts`` / ``routed_expert_weights`` value: strict base64 of a complete ``.npy`` file.

    Raises ValueError naming ``field`` and what is wrong: not a string, not base64, no ``.npy`` header (e.g.
    SGLang's raw int32 ``meta_info["routed_experts"]``), an object (pickled) array, a truncated payload or
    bytes after the array."""
    if isinstance(s, str):
        try:
            s = s.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"{field}: not base64 (non-ASCII characters)") from None
    elif not isinstance(s, (bytes, bytearray)):
        raise ValueError(f"{field}: expected a base64 string, got {type(s).__name__}")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{field}: not standard base64 with padding ({exc})") from None
    if not raw.startswith(NPY_MAGIC):
        raise ValueError(
            f"{field}: the decoded bytes do not start with the .npy magic \\x93NUMPY ({len(raw)} bytes, first "
            f"{raw[:8]!r}): not vLLM's base64-of-.npy encoding. SGLang's meta_info['routed_experts'] is raw int32 "
            f"without a header and this repository's SGLang patches return meta_info['expert_routing']: "
            f"{_SGLANG_HINT}"
        )
    buf = io.BytesIO(raw)
    try:
        arr = np.load(buf, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise ValueError(f"{field}: the .npy payload holds Python objects (pickled); refused") from None
        raise ValueError(f"{field}: malformed .npy payload ({exc})") from None
    except Exception as exc:  # EOFError, UnpicklingError, ... from a truncated or garbled file
        raise ValueError(f"{field}: malformed .npy payload ({type(exc).__name__}: {exc})") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{field}: expected one .npy array, got {type(arr).__name__}")
    if buf.tell() != len(raw):
        raise ValueError(f"{field}: {len(raw) - buf.tell()} bytes after the .npy array (truncated or concatenated?)")
    return arr


# ------------------------------------------------------------------------------------------------
# one completion's routing
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RoutedExperts:
    """One completion's routing. ``ids[r, l, k]`` is the k-th expert of decoder layer ``l`` for token position
    ``prompt_start + r``; ``weights`` (or None when the engine was started without
    ``enable_return_routed_expert_weights``) has the same shape. Construct with :meth:`from_choice`,
    :meth:`from_completion_output` or directly; the constructor checks shapes and dtypes."""

    ids: np.ndarray
    weights: np.ndarray | None = None
    prompt_start: int = 0

    def __post_init__(self):
        ids, w = self.ids, self.weights
        if not isinstance(ids, np.ndarray):
            raise ValueError(f"{IDS_FIELD}: expected a numpy array, got {type(ids).__name__}")
        if ids.ndim != 3:
            raise ValueError(f"{IDS_FIELD}: expected rank 3 [tokens, layers, top_k], got shape {ids.shape}")
        if ids.dtype not in ID_DTYPES:
            raise ValueError(
                f"{IDS_FIELD}: expected uint8, uint16 or int32 expert ids, got {ids.dtype} "
                f"(SGLang payloads: {_SGLANG_HINT})"
            )
        if ids.dtype == np.int32 and ids.size and int(ids.min()) < 0:
            raise ValueError(f"{IDS_FIELD}: negative expert id {int(ids.min())}")
        if w is not None:
            if not isinstance(w, np.ndarray):
                raise ValueError(f"{WEIGHTS_FIELD}: expected a numpy array, got {type(w).__name__}")
            if w.dtype != WEIGHTS_DTYPE:
                raise ValueError(f"{WEIGHTS_FIELD}: expected float32, got {w.dtype}")
            if w.shape != ids.shape:
                raise ValueError(f"{WEIGHTS_FIELD}: shape {w.shape} differs from {IDS_FIELD} shape {ids.shape}")
        if isinstance(self.prompt_start, bool) or not isinstance(self.prompt_start, (int, np.integer)):
            raise ValueError(f"{PROMPT_START_FIELD}: expected an int, got {self.prompt_start!r}")
        if self.prompt_start < 0:
            raise ValueError(f"{PROMPT_START_FIELD}: must be >= 0, got {self.prompt_start}")
        object.__setattr__(self, "prompt_start", int(self.prompt_start))

    @property
    def num_positions(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def positions(self) -> range:
        """The absolute token positions the rows cover."""
        return range(self.prompt_start, self.prompt_start + self.num_positions)

    def check(
        self,
        *,
        num_tokens: int | None = None,
        num_layers: int | None = None,
        top_k: int | None = None,
        num_experts: int | None = None,
    ) -> RoutedExperts:
        """Check against what the caller knows; returns self. num_tokens = prompt + generated tokens of the
        completion (rows must be num_tokens - 1 - prompt_start)."""
        if num_tokens is not None and self.num_positions != num_tokens - 1 - self.prompt_start:
            raise ValueError(
                f"{IDS_FIELD}: {self.num_positions} rows, expected {num_tokens - 1 - self.prompt_start} "
                f"(prompt + generated tokens {num_tokens}, minus the last sampled token, minus prompt_start "
                f"{self.prompt_start})"
            )
        if num_layers is not None and self.num_layers != num_layers:
            raise ValueError(
                f"{IDS_FIELD}: {self.num_layers} layers, expected {num_layers} (every decoder layer, dense ones "
                "included, as upstream vLLM returns them)"
            )
        if top_k is not None and self.top_k != top_k:
            raise ValueError(f"{IDS_FIELD}: top_k {self.top_k}, expected {top_k}")
        if num_experts is not None and self.ids.size and int(self.ids.max()) >= num_experts:
            raise ValueError(f"{IDS_FIELD}: expert id {int(self.ids.max())} out of range for {num_experts} experts")
        return self

    @classmethod
    def from_completion_output(cls, output: Any, prompt_start: int = 0) -> RoutedExperts:
        """From an offline ``vllm.CompletionOutput`` (``LLM.generate(...)[i].outputs[j]``). prompt_start: the
        request's ``SamplingParams.routed_experts_prompt_start`` (the output does not repeat it)."""
        ids = getattr(output, IDS_FIELD, None)
        if ids is None:
            raise RoutedExpertsMissing(
                f"CompletionOutput.{IDS_FIELD} is None: start the engine with LLM(..., "
                "enable_return_routed_experts=True) (None also when the request was aborted before any forward pass)"
            )
        return cls(np.asarray(ids), getattr(output, WEIGHTS_FIELD, None), prompt_start)

    @classmethod
    def from_choice(cls, choice: Any, prompt_start: int | None = None) -> RoutedExperts:
        return from_choice(choice, prompt_start)


def get_field(obj: Any, name: str) -> Any:
    """A response field from a dict (requests/httpx JSON) or an openai-python object (fields the openai types do
    not declare, like ``routed_experts`` or vLLM's ``token_ids``, land in ``model_extra``); None when absent."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    extra = getattr(obj, "model_extra", None)
    if isinstance(extra, Mapping) and name in extra:
        return extra[name]
    return getattr(obj, name, None)


def _has_key(obj: Any, name: str) -> bool:
    """Whether the response carried the key at all (vLLM 0.22+ and this series send ``"routed_experts": null`` on
    every non-streamed choice; a streamed non-final chunk has no such key)."""
    if isinstance(obj, Mapping):
        return name in obj
    extra = getattr(obj, "model_extra", None)
    return (isinstance(extra, Mapping) and name in extra) or name in getattr(type(obj), "model_fields", {})


def from_choice(choice: Any, prompt_start: int | None = None) -> RoutedExperts:
    """Decode the routing of one OpenAI ``choice``: ``/v1/completions``, ``/v1/chat/completions`` (the fields sit
    on the choice, not on ``message``), SageMaker ``/invocations``, ``/inference/v1/generate`` (its JSON choices),
    or the final chunk of a streamed choice (the chunk carrying its finish_reason). ``choice``: an openai-python
    object or a plain dict.

    prompt_start: the ``routed_experts_prompt_start`` the request sent, for servers that do not echo it
    (upstream vLLM); when the choice echoes it, the two must agree. Default 0."""
    raw_ids = get_field(choice, IDS_FIELD)
    if raw_ids is None:
        if get_field(choice, "sglext") is not None:
            raise RoutedExpertsMissing(f"choice has no {IDS_FIELD!r} but an SGLang 'sglext' field: {_SGLANG_HINT}")
        if get_field(choice, "finish_reason") is None:
            raise RoutedExpertsMissing(
                f"choice has no {IDS_FIELD!r} and no finish_reason: when streaming, the routing arrives on the final "
                f"chunk of each choice (the one carrying its finish_reason); otherwise {_SERVER_HINT}"
            )
        message = get_field(choice, "message")
        if message is not None and get_field(message, IDS_FIELD) is not None:
            raise ValueError(f"{IDS_FIELD!r} found on choice.message: the server puts it on the choice itself")
        if _has_key(choice, IDS_FIELD):
            raise RoutedExpertsMissing(
                f"choice has {IDS_FIELD!r}: null: the server returns no routing ({_SERVER_HINT}), the request used "
                "beam search, or it was aborted before any forward pass"
            )
        raise RoutedExpertsMissing(
            f"choice has no {IDS_FIELD!r} field: {_SERVER_HINT}; a null value also means the request was aborted "
            "before any forward pass"
        )
    ids = decode_npy_b64(raw_ids, field=IDS_FIELD)
    raw_w = get_field(choice, WEIGHTS_FIELD)
    weights = None if raw_w is None else decode_npy_b64(raw_w, field=WEIGHTS_FIELD)
    echoed = get_field(choice, PROMPT_START_FIELD)
    if echoed is not None:
        if isinstance(echoed, bool) or not isinstance(echoed, int):
            raise ValueError(f"{PROMPT_START_FIELD}: expected an int, got {echoed!r}")
        if prompt_start is not None and prompt_start != echoed:
            raise ValueError(f"{PROMPT_START_FIELD}: the request sent {prompt_start}, the server used {echoed}")
        start = echoed
    else:
        start = 0 if prompt_start is None else prompt_start
    return RoutedExperts(ids, weights, start)


def from_response(response: Any, prompt_start: int | None = None) -> list[RoutedExperts]:
    """Every choice of a (non-streamed) completions or chat response, in ``choices[i].index`` order."""
    choices = get_field(response, "choices")
    if not isinstance(choices, Sequence) or isinstance(choices, (str, bytes)):
        raise ValueError("response has no 'choices' list")
    indexed = sorted(choices, key=lambda c: get_field(c, "index") or 0)
    return [from_choice(c, prompt_start) for c in indexed]


# ------------------------------------------------------------------------------------------------
# which decoder layers are MoE layers (mirrors vLLM 0.15.1's model files)
# ------------------------------------------------------------------------------------------------
def _cfg(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _qwen_moe_layers(c: Any, n: int) -> list[int]:
    # vllm/model_executor/models/qwen2_moe.py and qwen3_moe.py, *DecoderLayer.__init__:
    #   (layer_idx not in mlp_only_layers) and (num_experts > 0 and (layer_idx + 1) % decoder_sparse_step == 0)
    mlp_only = set(_cfg(c, "mlp_only_layers", None) or [])
    num_experts = _cfg(c, "num_experts", 0) or 0
    step = _cfg(c, "decoder_sparse_step", 1)
    if num_experts <= 0:
        return []
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"decoder_sparse_step must be an int >= 1, got {step!r}")
    return [i for i in range(n) if i not in mlp_only and (i + 1) % step == 0]


def _deepseek_moe_layers(c: Any, n: int) -> list[int]:
    # vllm/model_executor/models/deepseek_v2.py, DeepseekV2DecoderLayer.__init__:
    #   n_routed_experts is not None and layer_idx >= first_k_dense_replace and layer_idx % moe_layer_freq == 0
    if _cfg(c, "n_routed_experts") is None:
        return []
    first_dense = _cfg(c, "first_k_dense_replace", 0) or 0
    freq = _cfg(c, "moe_layer_freq", 1)
    if not isinstance(freq, int) or freq < 1:
        raise ValueError(f"moe_layer_freq must be an int >= 1, got {freq!r}")
    return [i for i in range(n) if i >= first_dense and i % freq == 0]


def _glm4_moe_layers(c: Any, n: int) -> list[int]:
    # vllm/model_executor/models/glm4_moe.py, Glm4MoeDecoderLayer.__init__ (no moe_layer_freq there):
    #   n_routed_experts is not None and layer_idx >= first_k_dense_replace
    if _cfg(c, "n_routed_experts") is None:
        return []
    first_dense = _cfg(c, "first_k_dense_replace", 0) or 0
    return [i for i in range(n) if i >= first_dense]


def _all_layers(c: Any, n: int) -> list[int]:
    return list(range(n))


_MOE_LAYER_RULES = {
    "qwen2_moe": _qwen_moe_layers,
    "qwen3_moe": _qwen_moe_layers,
    "deepseek": _deepseek_moe_layers,  # DeepseekForCausalLM runs on deepseek_v2.py in vLLM 0.15.1
    "deepseek_v2": _deepseek_moe_layers,
    "deepseek_v3": _deepseek_moe_layers,
    "deepseek_v32": _deepseek_moe_layers,
    "glm4_moe": _glm4_moe_layers,
    "mixtral": _all_layers,
    "gpt_oss": _all_layers,
    "olmoe": _all_layers,
    "phimoe": _all_layers,
    "granitemoe": _all_layers,
    "granitemoeshared": _all_layers,
}


def _text_config(hf_config: Any) -> Any:
    """The config that describes the decoder: the config itself for the known model types, else its
    ``text_config`` when that one is known (multimodal wrappers)."""
    if _cfg(hf_config, "model_type") in _MOE_LAYER_RULES:
        return hf_config
    text = _cfg(hf_config, "text_config")
    if text is not None and _cfg(text, "model_type") in _MOE_LAYER_RULES:
        return text
    raise ValueError(
        f"moe_layer_indices: unknown model_type {_cfg(hf_config, 'model_type')!r}; known: "
        f"{', '.join(sorted(_MOE_LAYER_RULES))}. Read the model's vLLM file (vllm/model_executor/models/) to see "
        "which decoder layers build a FusedMoE and pass those indices yourself"
    )


def moe_layer_indices(hf_config: Any) -> list[int]:
    """Decoder-layer indices that are MoE layers, as vLLM 0.15.1 builds the model from this config.

    hf_config: a transformers config object or a config.json dict (``text_config`` is followed when the outer
    model type is not known). Known model types: Qwen1.5/Qwen2-MoE and Qwen3-MoE (``mlp_only_layers``,
    ``decoder_sparse_step``, ``num_experts``), DeepSeek(-V2/V3/V3.2) (``first_k_dense_replace``,
    ``moe_layer_freq``), GLM-4.5 (``first_k_dense_replace``), and all-MoE models (Mixtral, gpt-oss, OLMoE,
    Phi-MoE, Granite-MoE). Any other model type raises ValueError instead of guessing."""
    c = _text_config(hf_config)
    n = _cfg(c, "num_hidden_layers")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"moe_layer_indices: num_hidden_layers must be an int >= 1, got {n!r}")
    return _MOE_LAYER_RULES[_cfg(c, "model_type")](c, n)


def num_routed_experts(hf_config: Any) -> int | None:
    """Routed experts per MoE layer, looked up as upstream vLLM does: num_experts, n_routed_experts,
    num_local_experts (None when the config has none of them)."""
    for c in (hf_config, _cfg(hf_config, "text_config")):
        for name in ("num_experts", "n_routed_experts", "num_local_experts"):
            v = None if c is None else _cfg(c, name)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def routing_layout(hf_config: Any) -> dict[str, Any]:
    """What the returned arrays must look like for this model: ``num_hidden_layers`` (L: every decoder layer),
    ``moe_layers`` (:func:`moe_layer_indices`), ``num_experts`` (:func:`num_routed_experts`), ``top_k``
    (``num_experts_per_tok``) and ``routed_scaling_factor`` (None when the config lacks them), all read from the
    text config of a multimodal wrapper."""
    c = _text_config(hf_config)
    top_k = _cfg(c, "num_experts_per_tok")
    moe_layers = moe_layer_indices(c)  # first: its ValueError names what the config lacks
    return {
        "num_hidden_layers": int(_cfg(c, "num_hidden_layers")),
        "moe_layers": moe_layers,
        "num_experts": num_routed_experts(c),
        "top_k": top_k if isinstance(top_k, int) else None,
        "routed_scaling_factor": _cfg(c, "routed_scaling_factor"),
    }


def moe_rows(arr: np.ndarray, layers: Sequence[int]) -> np.ndarray:
    """``arr[:, layers, :]``: the rows of the given decoder layers (e.g. :func:`moe_layer_indices`)."""
    if arr.ndim != 3:
        raise ValueError(f"expected a [tokens, layers, top_k] array, got shape {arr.shape}")
    bad = [i for i in layers if not 0 <= i < arr.shape[1]]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range for {arr.shape[1]} decoder layers")
    return arr[:, list(layers), :]


def check_layer_layout(routed: RoutedExperts, moe_layers: Sequence[int]) -> None:
    """Cross-check the returned arrays against the MoE layers the config says: a dense layer's rows must be all
    zero (ids, and weights when present), every row of an MoE layer must have a non-zero weight. Raises ValueError
    naming the first layer that disagrees (the config rule and the engine's model disagree)."""
    moe = set(moe_layers)
    bad = [i for i in moe if not 0 <= i < routed.num_layers]
    if bad:
        raise ValueError(f"MoE layer(s) {sorted(bad)} out of range for {routed.num_layers} decoder layers")
    if routed.num_positions == 0:
        return
    for layer in range(routed.num_layers):
        ids = routed.ids[:, layer]
        w = None if routed.weights is None else routed.weights[:, layer]
        if layer not in moe:
            if ids.any() or (w is not None and w.any()):
                raise ValueError(
                    f"decoder layer {layer} is dense per the model config but its returned rows are not all zero: "
                    "the config's MoE layers and the engine's disagree"
                )
        elif w is not None and not w.any(axis=-1).all():
            t = int(np.flatnonzero(~w.any(axis=-1))[0])
            raise ValueError(
                f"decoder layer {layer} is an MoE layer per the model config but row {t} (position "
                f"{routed.prompt_start + t}) has all-zero weights: the config's MoE layers and the engine's "
                "disagree, or the engine returned a row it did not fill"
            )
