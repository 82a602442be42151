"""The models' sections of a run config: the student, its teacher (`teacher.*`) or its teachers (`teachers`, a
map or list of teacher sections), each teacher serving the rows of the data sources it names, one the default.
`run_teachers` is the one place a run's teachers are read from, whichever way they were given."""
from dataclasses import dataclass, field
from typing import Optional

from megatron_opd.config.checks import ConfigError, check, check_url, one_of
from megatron_opd.rollout.sglang_server import SGLangConfig

MODEL_DTYPES = ("float32", "bfloat16")
TEACHER_ENGINES = ("megatron", "sglang")
# same: the student's tokenizer (ids compared directly); cross: another, aligned by text (data/xtok/); auto: same
# where the tokenizers agree by content, cross otherwise, said at start-up
TOKENIZER_MODES = ("same", "cross", "auto")
SINGLE_TEACHER = "teacher"  # the name of the one teacher of `teacher.*` in metrics and messages


@dataclass
class ModelConfig:
    path: Optional[str] = None  # an HF model directory or a converted Megatron checkpoint
    dtype: Optional[str] = None  # null: the checkpoint's own (config.json's torch_dtype)

    def __post_init__(self):
        if self.dtype is not None:
            one_of("model.dtype", self.dtype, MODEL_DTYPES)


TEACHER_LAYOUT_KEYS = ("tensor", "pipeline", "expert")


@dataclass
class TeacherParallelConfig:
    tensor: Optional[int] = None  # null: the student's parallel.tensor
    pipeline: Optional[int] = None  # null: the student's parallel.pipeline
    expert: Optional[int] = None  # a mixture-of-experts teacher's expert parallelism; null: the student's
                                  # co-located, 1 in a layout of its own

    def __post_init__(self):
        for key in TEACHER_LAYOUT_KEYS:
            value = getattr(self, key)
            check(value is None or (isinstance(value, int) and value >= 1), f"teacher.parallel.{key}", value,
                  "must be null (the student's) or an integer >= 1")


@dataclass
class TeacherConfig(ModelConfig):
    engine: str = "megatron"  # megatron: on the trainer's ranks | sglang: its own SGLang server
    parallel: TeacherParallelConfig = field(default_factory=TeacherParallelConfig)  # engine=megatron
    url: Optional[str] = None  # engine=sglang: a server already serving the teacher (null: rank 0 starts one)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)  # engine=sglang: the server rank 0 starts
    # Several teachers: the data_source values of the rows this one scores; `default`: it also scores every
    # row whose data source no teacher names. One teacher (`teacher.*`) scores every row.
    data_sources: list[str] = field(default_factory=list)
    default: bool = False
    tokenizer: str = "same"  # same | cross | auto (TOKENIZER_MODES)

    def __post_init__(self):
        super().__post_init__()
        one_of("teacher.engine", self.engine, TEACHER_ENGINES)
        one_of("teacher.tokenizer", self.tokenizer, TOKENIZER_MODES)
        check(self.url is None or self.engine == "sglang", "teacher.url", self.url,
              "names a served teacher's SGLang server: set teacher.engine=sglang, or teacher.url=null")
        check_url("teacher.url", self.url)
        for key in TEACHER_LAYOUT_KEYS:
            check(self.engine == "megatron" or getattr(self.parallel, key) is None, f"teacher.parallel.{key}",
                  getattr(self.parallel, key), "is the Megatron teacher's layout; a served teacher "
                  "(teacher.engine=sglang) takes its GPUs from teacher.sglang (tensor_parallel, base_gpu_id)")
        self.data_sources = list(self.data_sources)
        check(all(isinstance(s, str) and s for s in self.data_sources), "teacher.data_sources", self.data_sources,
              "must be a list of data_source values")


def _named_teacher(name: str, raw) -> TeacherConfig:
    """One entry of `teachers` as a validated TeacherConfig; its errors name `teachers.<name>.<key>`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(raw, TeacherConfig):
        return raw
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TeacherConfig), raw))
    except ConfigError as err:
        raise ConfigError(str(err).replace("teacher.", f"teachers.{name}.", 1)) from None
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"teachers.{name}: {str(err).splitlines()[0]} (a teacher takes the keys of teacher.*: "
                          f"path, dtype, engine, parallel, url, sglang, data_sources, default, tokenizer)") from None


def parse_teachers(raw) -> dict[str, TeacherConfig]:
    """`teachers` as {name: TeacherConfig}: a map name -> section, or a list of sections each with a `name`."""
    if raw is None:
        return {}
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(raw, (DictConfig, ListConfig)):
        raw = OmegaConf.to_container(raw)
    if isinstance(raw, list):
        named = {}
        for i, entry in enumerate(raw):
            check(isinstance(entry, dict) and isinstance(entry.get("name"), str), f"teachers[{i}]", entry,
                  "each teacher of a list needs a name (name: math, path: ..., data_sources: [...])")
            entry = dict(entry)
            name = entry.pop("name")
            check(name not in named, f"teachers[{i}].name", name, "names another teacher too")
            named[name] = entry
        raw = named
    check(isinstance(raw, dict), "teachers", raw, "must be a map name -> teacher section, or a list of sections")
    teachers = {name: _named_teacher(name, entry or {}) for name, entry in raw.items()}
    _check_routing(teachers)
    return teachers


def _check_routing(teachers: dict[str, TeacherConfig]) -> None:
    defaults = [name for name, t in teachers.items() if t.default]
    check(len(defaults) <= 1, "teachers", sorted(teachers), f"{' and '.join(defaults)} are both default: one "
          f"teacher at most scores the rows no teacher names")
    owner = {}
    for name, teacher in teachers.items():
        check(bool(teacher.path), f"teachers.{name}.path", teacher.path, "is required")
        check(teacher.default or bool(teacher.data_sources) or len(teachers) == 1, f"teachers.{name}.data_sources",
              teacher.data_sources, "names no data source and the teacher is not the default: it would score "
              "no row. List its sources or set default=true")
        for source in teacher.data_sources:
            check(source not in owner, f"teachers.{name}.data_sources", teacher.data_sources,
                  f"{source!r} is teachers.{owner.get(source)}'s already: a row has one teacher")
            owner[source] = name


class TeacherRouting:
    """Which teacher scores a row, by its data_source."""

    def __init__(self, teachers: dict[str, TeacherConfig]):
        self.names = list(teachers)
        self.owner = {source: name for name, t in teachers.items() for source in t.data_sources}
        defaults = [name for name, t in teachers.items() if t.default or len(teachers) == 1]
        self.default = defaults[0] if defaults else None

    def teacher_of(self, data_source: str) -> Optional[str]:
        return self.owner.get(data_source, self.default)

    def index_of(self, data_source: str) -> int:
        return self.names.index(self.teacher_of(data_source))
