import pytest

from megatron_opd.parallel import expand_hostlist, read_launch_env


@pytest.mark.parametrize("hostlist, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,7]", ["gpu01", "gpu02", "gpu03", "gpu7"]),
    ("a[1-2],b,c[09-10]", ["a1", "a2", "b", "c09", "c10"]),
    ("rack1-n[3-4]", ["rack1-n3", "rack1-n4"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_torchrun_env():
    env = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="10.0.0.5", MASTER_PORT="1234")
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port,
            launch.source) == (3, 8, 1, "10.0.0.5", 1234, "torchrun")


def test_slurm_env_takes_master_from_the_first_node():
    env = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_NODELIST="gpu[07-08]")
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.source) == (
        5, 8, 1, "gpu07", "slurm")


def test_torchrun_inside_srun_wins_over_slurm():
    env = dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_NODELIST="n1", RANK="7", WORLD_SIZE="16")
    assert read_launch_env(env).source == "torchrun"


def test_no_launcher_is_a_single_process():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.source) == (0, 1, "single")


def test_bad_values_name_the_variable():
    with pytest.raises(ValueError, match=r"SLURM_NTASKS='two' is not an integer"):
        read_launch_env(dict(SLURM_PROCID="0", SLURM_NTASKS="two", SLURM_JOB_NODELIST="n1"))
    with pytest.raises(ValueError, match=r"neither MASTER_ADDR nor SLURM_JOB_NODELIST"):
        read_launch_env(dict(SLURM_PROCID="0", SLURM_NTASKS="2"))
