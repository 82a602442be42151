"""opd-doctor's whole run: the cheap checks (vocab, temperature, memory), then, in this one process on the
run's device, the measured ones on a few real rows (self_test, engine, and per teacher teacher_loaded and
topk_clamps). A measured check that cannot run is a failure naming why, never a traceback."""
import torch
import torch.distributed as dist

from megatron_opd.config import OPDConfig, run_teachers, teacher_key
from megatron_opd.doctor.checks.engine import check_engine
from megatron_opd.doctor.checks.memory import check_memory
from megatron_opd.doctor.checks.self_test import check_self_test
from megatron_opd.doctor.checks.teacher_loaded import check_teacher_loaded
from megatron_opd.doctor.checks.temperature import check_temperature
from megatron_opd.doctor.checks.topk_clamps import check_topk_clamps
from megatron_opd.doctor.checks.vocab import check_vocab, vocab_size
from megatron_opd.doctor.report import FAIL, WARN, Finding, Report
from megatron_opd.doctor.session import ONE_PROCESS, Session, free_memory
from megatron_opd.parallel import LaunchEnv, free_port, init_distributed, initialize_model_parallel, resolve_device
from megatron_opd.parallel.distributed import destroy

CHEAP = ("vocab", "temperature", "memory")
MEASURED = ("self_test", "engine", "teacher_loaded", "topk_clamps")
CHECKS = CHEAP + MEASURED


def cheap_checks(cfg: OPDConfig, world_size: int, device: torch.device, wanted=CHEAP) -> Report:
    report = Report()
    if "vocab" in wanted:
        report.add(*check_vocab(cfg))
    if "temperature" in wanted:
        report.add(*check_temperature(cfg))
    if "memory" in wanted:
        report.add(*check_memory(cfg, world_size, device))
    return report


def _guarded(check: str, fn, *args, subject=None) -> list:
    try:
        found = fn(*args)
    except Exception as err:  # a doctor reports what breaks; the trainer would meet the same error
        return [Finding(check, FAIL, f"could not run: {type(err).__name__}: {err}", subject)]
    return found if isinstance(found, list) else [found]


def _own_process_group(device: torch.device) -> bool:
    """Joins a process group of this one process unless one exists (a test's worker); True when it did."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("opd-doctor runs in one process; start it without torchrun / srun")
        return False
    init_distributed(launch=LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                                      master_port=free_port(), source="single"), device=device)
    return True


def _teacher_checks(session, cfg: OPDConfig, wanted, ok_teachers, cross_teachers) -> list:
    found = []
    for name, teacher_cfg in run_teachers(cfg).items():
        key = teacher_key(cfg, name)
        if name not in ok_teachers:
            found += [Finding(check, WARN, f"not run: {key} failed the vocab check", name)
                      for check in MEASURED[2:] if check in wanted]
            continue
        if name in cross_teachers:  # these checks read the teacher on the student's ids
            found += [Finding(check, WARN, f"not measured: {key} has another tokenizer (tokenizer=cross); the run's "
                                           f"xtok/* metrics say how its responses align", name)
                      for check in MEASURED[2:] if check in wanted]
            continue
        if teacher_cfg.engine == "sglang":
            if "teacher_loaded" in wanted:
                found += _guarded("teacher_loaded", check_teacher_loaded, session, key, name, teacher_cfg, None,
                                  subject=name)
            if "topk_clamps" in wanted:
                found.append(Finding("topk_clamps", WARN, f"not measured: {key} is served (engine=sglang) and its "
                                                          f"server is not started by the doctor", name))
            continue
        teacher = None
        try:
            teacher = session.teacher(teacher_cfg, key)
            if "teacher_loaded" in wanted:
                found += _guarded("teacher_loaded", check_teacher_loaded, session, key, name, teacher_cfg, teacher,
                                  subject=name)
            if "topk_clamps" in wanted:
                found += _guarded("topk_clamps", check_topk_clamps, session, key, name, teacher, subject=name)
        except Exception as err:
            found += [Finding(check, FAIL, f"{key}.path={teacher_cfg.path}: the teacher could not be built: "
                                           f"{type(err).__name__}: {err}", name) for check in MEASURED[2:]
                      if check in wanted]
        finally:
            if teacher is not None:
                teacher.close()
            teacher = None
            free_memory(session.dims.device)
    return found


def _measured(cfg: OPDConfig, report: Report, device: torch.device, wanted) -> list:
    vocab_findings = report.of("vocab") or check_vocab(cfg)
    ok_teachers = {f.subject for f in vocab_findings if f.status != FAIL}
    cross_teachers = {f.subject for f in vocab_findings if f.details.get("tokenizer_mode") == "cross"}
    size = vocab_size([f for f in vocab_findings if f.status != FAIL])
    if size is None:
        return [Finding(check, FAIL, "not run: no student/teacher pair passes the vocab check")
                for check in MEASURED if check in wanted]
    owned = _own_process_group(device)
    session = None
    try:
        dims = initialize_model_parallel(ONE_PROCESS, seed=cfg.trainer.seed)
        session = Session(cfg, size, dims)
        found = []
        distill = cfg.trainer.mode == "distill"
        if "self_test" in wanted:
            found += _guarded("self_test", check_self_test, session) if distill else []
        if "engine" in wanted:
            found += _guarded("engine", check_engine, session)
        if distill:
            found += _teacher_checks(session, cfg, wanted, ok_teachers, cross_teachers)
        return found
    except Exception as err:
        return [Finding(check, FAIL, f"could not set up the student on {device}: {type(err).__name__}: {err}")
                for check in MEASURED if check in wanted]
    finally:
        if session is not None:
            session.close()
        if owned:
            destroy()


def run_doctor(cfg: OPDConfig, checks=CHECKS, world_size: int = None, device: torch.device = None) -> Report:
    """Every check in `checks` (names of CHECKS); `world_size`: the run's (default: the layout's smallest,
    TP x PP x CP); `device`: default trainer.device resolved here."""
    device = device or resolve_device(cfg.trainer.device, announce=False)
    world_size = world_size or cfg.parallel.model_parallel_size
    report = cheap_checks(cfg, world_size, device, [c for c in CHEAP if c in checks])
    wanted = [c for c in MEASURED if c in checks]
    if wanted:
        report.add(*_measured(cfg, report, device, wanted))
    return report
