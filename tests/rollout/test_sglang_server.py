"""No SGLang server outlives the process that started it: a trainer stand-in (a child Python process) starts a
real CPU server through SGLangServer and is SIGKILLed; the server and SGLang's own worker processes follow."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTER = """
import sys
from megatron_opd.rollout.sglang_server import SGLangServer
from tests.sglang_servers import sglang_config

server = SGLangServer(sys.argv[1], sglang_config(log_path=sys.argv[2]))
server.start()
print(server.process.pid, flush=True)
sys.stdin.read()  # until killed
"""


def _session(sid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of a process session."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


def test_server_dies_with_the_process_that_started_it(tiny_models, tmp_path):
    starter = subprocess.Popen([sys.executable, "-c", STARTER, tiny_models["qwen2"], str(tmp_path / "server.log")],
                               cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    server_pid = None
    try:
        line = starter.stdout.readline()
        if not line.strip().isdigit():
            log = tmp_path / "server.log"
            pytest.fail(f"the server did not start; log tail:\n{log.read_text()[-3000:] if log.exists() else '(none)'}")
        server_pid = int(line)
        server_processes = _session(server_pid)  # SGLang's launcher, scheduler and detokenizer
        assert len(server_processes) >= 3, [p.cmdline() for p in server_processes]
        starter.send_signal(signal.SIGKILL)
        starter.wait()
        deadline = time.monotonic() + 10
        while _session(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _session(server_pid), [p.cmdline() for p in _session(server_pid)]
    finally:
        starter.kill()
        if server_pid is not None and _session(server_pid):
            os.killpg(server_pid, signal.SIGKILL)
