"""Who am I in the job: rank, world size, local rank and the rendezvous address, read from torchrun's
environment or, when the process was started by `srun` directly, from SLURM's."""
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand SLURM's compressed host list: 'gpu[01-03,7],login1' -> gpu01 gpu02 gpu03 gpu7 login1."""
    hosts = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", hostlist):
        prefix, ranges, suffix = match.groups()
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for number in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{number:0{width}d}{suffix}")
    return hosts


def _int(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def read_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """torchrun's variables win when both are present (torchrun inside an srun task sets them)."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
                         local_rank=int(env.get("LOCAL_RANK", 0)),
                         master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port, source="torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        master = env.get("MASTER_ADDR")
        if not master:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise ValueError("SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_JOB_NODELIST is; "
                                 "cannot find the rendezvous host")
            master = expand_hostlist(nodelist)[0]
        return LaunchEnv(rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_NTASKS"),
                         local_rank=int(env.get("SLURM_LOCALID", 0)), master_addr=master,
                         master_port=port, source="slurm")
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=port,
                     source="single")
