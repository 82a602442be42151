"""What opd-doctor found: one finding per check (and per teacher where a check runs per teacher), each ok, warn
or fail with what to change; the whole as text or as a JSON document, and the exit code (0 ok, 1 warn, 2 fail)."""
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

OK, WARN, FAIL = "ok", "warn", "fail"
EXIT_CODES = {OK: 0, WARN: 1, FAIL: 2}
LABELS = {OK: "[ok]  ", WARN: "[warn]", FAIL: "[FAIL]"}


@dataclass
class Finding:
    check: str  # the check's name: vocab, temperature, self_test, teacher_loaded, engine, topk_clamps, memory
    status: str  # ok | warn | fail
    message: str  # what was measured or found; on warn/fail, the key or file at fault and what to change
    subject: Optional[str] = None  # the teacher it is about, where the check runs per teacher
    details: dict = field(default_factory=dict)  # the numbers behind the status (JSON-serialisable)


def worst(statuses) -> str:
    return max(statuses, key=EXIT_CODES.get, default=OK)


@dataclass
class Report:
    findings: list = field(default_factory=list)

    def add(self, *findings: Finding) -> None:
        self.findings.extend(findings)

    def of(self, check: str, subject: Optional[str] = None) -> list:
        """The findings of `check` (about `subject`, when given)."""
        return [f for f in self.findings if f.check == check and (subject is None or f.subject == subject)]

    @property
    def status(self) -> str:
        return worst(f.status for f in self.findings)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def counts(self) -> dict:
        return {status: sum(f.status == status for f in self.findings) for status in EXIT_CODES}

    def text(self) -> str:
        lines = []
        for f in self.findings:
            name = f"{f.check} ({f.subject})" if f.subject else f.check
            lines.append(f"{LABELS[f.status]} {name}: {f.message}")
        counts = self.counts()
        lines.append(f"opd-doctor: {counts[FAIL]} fail, {counts[WARN]} warn, {counts[OK]} ok (exit code "
                     f"{self.exit_code})")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"status": self.status, "exit_code": self.exit_code, "counts": self.counts(),
                           "findings": [asdict(f) for f in self.findings]}, indent=2, default=str)
