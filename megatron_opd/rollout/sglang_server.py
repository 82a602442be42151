"""An SGLang server as a child process on the run's device: launch with a free port, wait for health with a
deadline (showing the log tail when start-up fails), stop, tell whether it is still alive. The server dies
with the process that started it, even when that process is SIGKILLed. Or one this run did not start
(`ServerAt`: rollout.url, teacher.url), which it never starts or stops."""
import functools
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import requests
import torch

from megatron_opd.parallel import free_port
from megatron_opd.parallel.lifetime import die_with_parent

SGLANG_VERSION = "0.5.23"
WEIGHT_SYNC_ROUTES = ("tensor", "distributed", "disk")
# Without a cap a CPU server reserves most of the host memory for its KV cache; on a GPU,
# mem_fraction_static sizes it.
CPU_MAX_TOTAL_TOKENS = 8192


class SGLangConfigError(ValueError):
    """A `rollout.sglang.*` value that cannot work; the message names the key."""


@dataclass
class SGLangConfig:
    python: str = sys.executable
    tensor_parallel: int = 1
    host: str = "127.0.0.1"
    port: Optional[int] = None  # None: a free port
    dtype: str = "auto"
    max_total_tokens: Optional[int] = None  # None: CPU_MAX_TOTAL_TOKENS on a CPU, SGLang's own sizing on a GPU
    # GPU only: the server uses GPUs base_gpu_id .. base_gpu_id + tensor_parallel - 1, numbered as the trainer
    # sees them (the server inherits CUDA_VISIBLE_DEVICES, so CUDA IPC handles name the same GPUs on both sides).
    base_gpu_id: int = 0
    # The share of each server GPU for weights + KV cache (SGLang's --mem-fraction-static); None: SGLang's
    # choice, which assumes the GPUs are the server's alone.
    mem_fraction_static: Optional[float] = None
    # GPU only: the server shares its GPUs with the trainer and frees their memory during the trainer's update
    # (SGLang's memory saver, which needs `pip install torch-memory-saver`). Ignored on a CPU.
    colocated: bool = False
    max_running_requests: Optional[int] = None
    extra_args: list[str] = field(default_factory=list)
    pythonpath: list[str] = field(default_factory=list)  # prepended to the server's PYTHONPATH only
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 300.0
    log_path: Optional[str] = None
    weight_sync: str = "tensor"  # tensor (same node) | distributed | disk
    bucket_bytes: int = 512 * 2**20
    keep_snapshot: bool = True  # a host-memory copy of the pushed weights, to restore a restarted server
    max_retries: int = 2
    concurrency: int = 8

    def __post_init__(self):
        checks = (
            ("weight_sync", self.weight_sync in WEIGHT_SYNC_ROUTES, f"must be one of {'|'.join(WEIGHT_SYNC_ROUTES)}"),
            ("tensor_parallel", self.tensor_parallel >= 1, "must be >= 1 (GPUs per server)"),
            ("base_gpu_id", self.base_gpu_id >= 0, "must be >= 0 (the index of the server's first GPU)"),
            ("mem_fraction_static", self.mem_fraction_static is None or 0 < self.mem_fraction_static < 1,
             "must be null or in (0, 1): the share of each server GPU for weights and KV cache"),
            ("max_total_tokens", self.max_total_tokens is None or self.max_total_tokens >= 1, "must be null or >= 1"),
            ("bucket_bytes", self.bucket_bytes >= 1, "must be >= 1 (bytes per weight-sync bucket)"),
            ("max_retries", self.max_retries >= 0, "must be >= 0"),
            ("concurrency", self.concurrency >= 1, "must be >= 1 (requests in flight)"),
            ("startup_timeout_s", self.startup_timeout_s > 0, "must be > 0"),
            ("request_timeout_s", self.request_timeout_s > 0, "must be > 0"),
        )
        for key, ok, need in checks:
            if not ok:
                raise SGLangConfigError(f"rollout.sglang.{key}={getattr(self, key)!r}: {need}")


class ServerStartError(RuntimeError):
    pass


HEALTH_TIMEOUT_S = 5.0


def unserved_layers_problem(arch) -> Optional[str]:
    """Why SGLang would serve another model than `arch` (a ModelArch), or None. Its Qwen3-MoE builds every
    layer as a MoE layer (it reads neither mlp_only_layers nor decoder_sparse_step), so a checkpoint with dense
    layers would be served without their MLPs."""
    if arch.architecture == "Qwen3MoeForCausalLM" and not all(arch.moe.moe_layers):
        dense = [i for i, routed in enumerate(arch.moe.moe_layers) if not routed]
        return (f"its layers {dense} are dense (mlp_only_layers / decoder_sparse_step), and SGLang {SGLANG_VERSION}'s "
                f"Qwen3-MoE builds every layer with experts; generate with the embedded engine (rollout.engine=local) "
                f"or score with the teacher on the trainer's ranks (teacher.engine=megatron)")
    return None


class ServerAt:
    """A server this run did not start, in the place of an SGLangServer. The engine recovers from a lost
    server by stop() then start(): here that leaves the server alone and waits (up to `startup_timeout_s`)
    until it answers again, so the request is retried without a restart. `key`: the config key that names it."""

    def __init__(self, url: str, config: SGLangConfig, key: str):
        self.url, self.config, self.key = url.rstrip("/"), config, key

    def healthy(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
        except requests.RequestException:
            return False

    def start(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                raise ServerStartError(f"{self.key}={self.url}: the SGLang server stopped answering /health for "
                                       f"{self.config.startup_timeout_s:.0f} s (its startup_timeout_s)")
            time.sleep(1.0)

    def stop(self) -> None:
        pass

    def log_tail(self, lines: int = 40) -> str:
        return f"(the server at {self.key}={self.url} was not started by this run and keeps its own log)"


class SGLangServer:
    def __init__(self, model_path: str, config: SGLangConfig, device: torch.device = torch.device("cpu")):
        self.model_path, self.config, self.device = model_path, config, device
        self.process: Optional[subprocess.Popen] = None
        self.port = config.port
        self.log_path = config.log_path or os.path.join(model_path, "sglang_server.log")

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def command(self) -> list[str]:
        cfg = self.config
        cmd = [cfg.python, "-m", "sglang.launch_server", "--model-path", self.model_path, "--host", cfg.host,
               "--port", str(self.port), "--tp-size", str(cfg.tensor_parallel), "--dtype", cfg.dtype,
               "--skip-server-warmup"]
        max_total_tokens = cfg.max_total_tokens
        if self.on_gpu:
            cmd += ["--device", "cuda", "--base-gpu-id", str(cfg.base_gpu_id)]
            if cfg.colocated:
                cmd += ["--enable-memory-saver"]  # without it /release_memory_occupation frees nothing
        else:
            cmd += ["--device", "cpu", "--attention-backend", "torch_native"]
            max_total_tokens = max_total_tokens or CPU_MAX_TOTAL_TOKENS
        for flag, value in (("--max-total-tokens", max_total_tokens),
                            ("--mem-fraction-static", cfg.mem_fraction_static),
                            ("--max-running-requests", cfg.max_running_requests)):
            if value is not None:
                cmd += [flag, str(value)]
        return cmd + list(cfg.extra_args)

    def _env(self) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if not self.on_gpu:
            env["SGLANG_USE_CPU_ENGINE"] = "1"
        if self.config.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([*self.config.pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def start(self) -> None:
        """Launch and wait until healthy. The server is SIGKILLed when the thread that calls this ends (Linux's
        parent-death signal follows the forking thread): call it from one that lives as long as the run, as
        the trainer's main thread does. SGLang's scheduler and detokenizer arm the same signal on the server."""
        if self.config.port is None:
            self.port = free_port()
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                            start_new_session=True,
                                            preexec_fn=functools.partial(die_with_parent, os.getpid()))
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"SGLang server exited with code {self.process.returncode} during start-up; "
                                       f"log tail ({self.log_path}):\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(1.0)
        self.stop()
        raise ServerStartError(f"SGLang server not healthy after {self.config.startup_timeout_s:.0f}s; "
                               f"log tail ({self.log_path}):\n{self.log_tail()}")

    def healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            return requests.get(self.url + "/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
        except requests.RequestException:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """End the server and its scheduler/detokenizer children (they share its process session)."""
        if self.process is None:
            return
        for sig, wait_s in ((15, 30), (9, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None
