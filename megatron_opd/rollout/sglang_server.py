"""An SGLang server as a child process: launch with a free port, wait for health with a deadline (showing
the log tail when start-up fails), stop, and tell whether it is still alive."""
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import requests
import torch

from megatron_opd.parallel import free_port

SGLANG_VERSION = "0.5.23"


@dataclass
class SGLangConfig:
    python: str = sys.executable
    tensor_parallel: int = 1
    host: str = "127.0.0.1"
    port: Optional[int] = None  # None: a free port
    dtype: str = "auto"
    max_total_tokens: Optional[int] = 8192  # without it SGLang reserves most of the memory it can see
    mem_fraction_static: Optional[float] = None
    max_running_requests: Optional[int] = None
    extra_args: list[str] = field(default_factory=list)
    pythonpath: list[str] = field(default_factory=list)  # prepended to the server's PYTHONPATH only
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 300.0
    log_path: Optional[str] = None
    weight_sync: str = "tensor"  # tensor (colocated) | distributed | disk
    bucket_bytes: int = 512 * 2**20
    max_retries: int = 2
    concurrency: int = 8

    def __post_init__(self):
        if self.weight_sync not in ("tensor", "distributed", "disk"):
            raise ValueError(f"rollout.sglang.weight_sync={self.weight_sync!r}: one of tensor|distributed|disk")


class ServerStartError(RuntimeError):
    pass


class SGLangServer:
    def __init__(self, model_path: str, config: SGLangConfig):
        self.model_path, self.config = model_path, config
        self.process: Optional[subprocess.Popen] = None
        self.port = config.port
        self.log_path = config.log_path or os.path.join(model_path, "sglang_server.log")

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def command(self) -> list[str]:
        cfg = self.config
        cmd = [cfg.python, "-m", "sglang.launch_server", "--model-path", self.model_path, "--host", cfg.host,
               "--port", str(self.port), "--tp-size", str(cfg.tensor_parallel), "--dtype", cfg.dtype,
               "--skip-server-warmup"]
        if not torch.cuda.is_available():
            cmd += ["--device", "cpu", "--attention-backend", "torch_native"]
        for flag, value in (("--max-total-tokens", cfg.max_total_tokens), ("--mem-fraction-static", cfg.mem_fraction_static),
                            ("--max-running-requests", cfg.max_running_requests)):
            if value is not None:
                cmd += [flag, str(value)]
        return cmd + list(cfg.extra_args)

    def _env(self) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if not torch.cuda.is_available():
            env["SGLANG_USE_CPU_ENGINE"] = "1"
        if self.config.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([*self.config.pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def start(self) -> None:
        if self.config.port is None:
            self.port = free_port()
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                            start_new_session=True)
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
            return requests.get(self.url + "/health", timeout=5).status_code == 200
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
