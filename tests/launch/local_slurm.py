"""A real SLURM cluster on the test machine: Debian's slurm-wlm and munge (installed with apt when missing),
a private munge daemon and key, a slurm.conf describing this machine, slurmctld and one `slurmd -N <node>`
per node on free ports. Nothing of the machine's own SLURM or munge (if any) is used or touched.

One node is this machine under its own host name. More nodes are simulated: each has its own slurmd, port,
spool directory, pid and log file, all on 127.0.0.1, under names that /etc/hosts maps to 127.0.0.1 (added
there once and left: they name nothing else, and another test run's cluster may be using them), so a job
spanning them crosses "nodes" as on a real cluster: one srun task and one torchrun per node.

The set-up needs root (slurmd runs jobs as their user; /etc/hosts) and, when the packages are missing,
Debian's repositories. It fails with a message saying what is missing instead of skipping.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurm-wlm", "munge")
# Where Debian puts them; root's PATH has /usr/sbin, a CI runner's may not.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel")
START_TIMEOUT_S = 60
LOOPBACK = "127.0.0.1"
HOSTS_FILE = Path("/etc/hosts")
# Names of simulated nodes: opd-node0, opd-node1, ...
SIMULATED_NODE_PREFIX = "opd-node"


class SlurmSetupError(RuntimeError):
    pass


def _which(program: str) -> Optional[str]:
    return shutil.which(program, path=SEARCH_PATH)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no file)"


def install_if_missing() -> Optional[float]:
    """apt-get install the packages when a program is missing; returns the seconds it took (None: present)."""
    if all(_which(p) for p in PROGRAMS):
        return None
    missing = [p for p in PROGRAMS if not _which(p)]
    if os.geteuid() != 0:
        raise SlurmSetupError(f"SLURM programs {missing} are missing and the tests are not root, so they cannot "
                              f"install them: run `apt-get install -y {' '.join(PACKAGES)}` as root")
    if not _which("apt-get"):
        raise SlurmSetupError(f"SLURM programs {missing} are missing and there is no apt-get to install "
                              f"{' '.join(PACKAGES)} (the SLURM tests expect a Debian-like machine)")
    started = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command, timeout in ((["apt-get", "update", "-q"], 600),
                             (["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], 900)):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise SlurmSetupError(f"`{' '.join(command)}` failed with exit code {done.returncode}:\n"
                                  f"{(done.stdout + done.stderr)[-3000:]}")
    still = [p for p in PROGRAMS if not _which(p)]
    if still:
        raise SlurmSetupError(f"installed {' '.join(PACKAGES)}, but {still} are still not found on {SEARCH_PATH}")
    return time.monotonic() - started


def _free_ports(count: int) -> list[int]:
    """Distinct ports: every socket stays bound until all are chosen."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _resolves_to_loopback(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == LOOPBACK
    except OSError:
        return False


def _hosts_file_addresses() -> dict[str, str]:
    """name -> address in /etc/hosts, the first line naming it winning (as in glibc)."""
    addresses: dict[str, str] = {}
    for line in HOSTS_FILE.read_text().splitlines():
        address, *names = line.split("#", 1)[0].split() or [""]
        for name in names:
            addresses.setdefault(name, address)
    return addresses


def map_to_loopback(names: list[str]) -> None:
    """Make each name resolve to 127.0.0.1 through /etc/hosts (read, not resolved: a name it lacks would go
    to the DNS servers), adding one line for those it lacks."""
    addresses = _hosts_file_addresses()
    elsewhere = {name: addresses[name] for name in names if addresses.get(name, LOOPBACK) != LOOPBACK}
    if elsewhere:
        raise SlurmSetupError(f"{HOSTS_FILE} maps the simulated nodes' names to other addresses {elsewhere}: "
                              f"remove those entries (the simulated nodes are all on {LOOPBACK})")
    missing = [name for name in names if name not in addresses]
    if not missing:
        return
    line = f"{LOOPBACK} {' '.join(missing)}"
    if os.geteuid() != 0:
        raise SlurmSetupError(f"the simulated nodes' names {missing} are not in {HOSTS_FILE} and the tests are "
                              f"not root, so they cannot add them: add the line `{line}` to {HOSTS_FILE}")
    ends_a_line = HOSTS_FILE.read_text().endswith("\n")
    with HOSTS_FILE.open("a") as hosts:  # appended in place: a container's /etc/hosts may be a mount
        hosts.write(("" if ends_a_line else "\n") + line + "\n")
    unresolved = [name for name in missing if not _resolves_to_loopback(name)]
    if unresolved:
        raise SlurmSetupError(f"added `{line}` to {HOSTS_FILE}, but {unresolved} do not resolve to {LOOPBACK} "
                              f"(does /etc/nsswitch.conf list `files` first for hosts?)")


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return max(512, total_kb // 1024 // 2)


class LocalSlurm:
    """start() / stop(); env() is the environment for sbatch & co. (SLURM_CONF points at this cluster).
    `nodes`: 1 (this machine under its host name) or more (simulated nodes, see the module's docstring)."""

    def __init__(self, root: Path, nodes: int = 1):
        if nodes < 1:
            raise SlurmSetupError(f"a cluster needs at least one node, not {nodes}")
        self.root = Path(root)
        # A unix socket path must stay under ~108 bytes, whatever the test's temp directory is.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="opd-munge-", dir="/tmp"))
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host] if nodes == 1 else [f"{SIMULATED_NODE_PREFIX}{i}" for i in range(nodes)]
        self.job_env: dict[str, str] = {}
        self.start_s: Optional[float] = None
        self.install_s: Optional[float] = None

    @staticmethod
    def program(name: str) -> str:
        return _which(name) or name

    def env(self, **extra: str) -> dict:
        """The submitting environment: this cluster's config, and no SLURM variables of an outer job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        return {**env, "SLURM_CONF": str(self.conf), **self.job_env, **extra}

    def _run(self, *command: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([_which(command[0]) or command[0], *command[1:]], env=self.env(),
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode:
            raise SlurmSetupError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                                  f"{self.logs()}")
        return done

    def _slurmd_file(self, node: str, suffix: str) -> Path:
        return self.root / f"slurmd-{node}.{suffix}"

    def logs(self) -> str:
        logs = [self.root / "slurmctld.log", *(self._slurmd_file(node, "log") for node in self.nodes),
                self.munge_dir / "munged.log"]
        return "\n".join(f"--- {path.name} (last lines)\n{_tail(path)}" for path in logs)

    def _write_conf(self) -> None:
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        r = self.root
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        self.conf.write_text("\n".join([
            "ClusterName=opdtest",
            # The address in brackets spares slurm a DNS lookup of this machine.
            f"SlurmctldHost={self.host}({LOOPBACK})",
            "SlurmUser=root", "SlurmdUser=root",
            # Each node's own port is on its NodeName line.
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
            f"AuthInfo=socket={self.munge_dir / 'munge.sock'},cred_expire=5",
            # slurmd replaces %n by its node name (-N): each node its own spool directory, pid and log file.
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={self._slurmd_file('%n', 'pid')}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={self._slurmd_file('%n', 'log')}",
            # No cgroups: they are often unavailable in containers and not needed here.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "MpiDefault=none", "ReturnToService=2", "JobRequeue=1",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1,bf_interval=1",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "MailProg=/bin/true",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0",
            # The SIGTERM-to-SIGKILL window in which a trainer ended by SLURM saves its checkpoint (the default).
            # It is never waited out: the job ends when the trainer exits, ~5-10 s after the signal here.
            "KillWait=30",
            # sbatch --wait polls at 2 s, then 8 s, then 32 s while its interval is below MinJobAge / 2 (so that
            # a job is not purged between two polls): at 5 it stays at 2 s. A finished job stays visible to
            # scontrol for 5 s at least (slurmctld purges once a minute); the tests follow a job every 0.2 s.
            "MinJobAge=5",
            # Trust this file over slurmd's hardware probe (a container's CPU count may differ).
            "SlurmdParameters=config_overrides",
            # Simulated nodes each claim the whole machine, as the nodes of a real cluster each have their own.
            *(f"NodeName={node} NodeAddr={LOOPBACK} Port={port} CPUs={os.cpu_count()} "
              f"RealMemory={_memory_mb()} State=UNKNOWN" for node, port in zip(self.nodes, node_ports)),
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def start(self) -> None:
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        self.munge_dir.chmod(0o700)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        m = self.munge_dir
        # --force: munged refuses to run as root otherwise.
        self._run("munged", "--force", f"--socket={m / 'munge.sock'}", f"--key-file={key}",
                  f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                  f"--seed-file={m / 'munged.seed'}")
        self._write_conf()
        if len(self.nodes) > 1:  # torchrun's rendezvous looks the first node's name up
            map_to_loopback(self.nodes)
        else:
            try:
                socket.gethostbyname(self.host)
            except OSError:
                self.job_env["OPD_MASTER_ADDR"] = LOOPBACK
        self._run("slurmctld", "-c")
        for node in self.nodes:
            self._run("slurmd", "-N", node)
        deadline = time.monotonic() + START_TIMEOUT_S
        states = []
        while time.monotonic() < deadline:
            states = self._run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if states == ["idle"] * len(self.nodes):
                self.start_s = time.monotonic() - started
                return
            time.sleep(0.2)
        raise SlurmSetupError(f"the nodes {self.nodes} are not all idle after {START_TIMEOUT_S} s (sinfo says "
                              f"{states})\n{self.logs()}")

    def stop(self) -> None:
        if self.conf.exists():
            self._run("scancel", "--user=root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self._run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        _kill_from_pid_files([*(self._slurmd_file(node, "pid") for node in self.nodes), self.root / "slurmctld.pid",
                              self.munge_dir / "munged.pid"])
        shutil.rmtree(self.munge_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Running, not a zombie (a daemon's parent, init in a container, may be slow to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_from_pid_files(pid_files: list[Path], timeout_s: float = 15) -> None:
    """SIGTERM to each daemon at once, SIGKILL to those still there after timeout_s."""
    pids = []
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
