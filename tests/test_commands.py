"""The README's two commands exist, and CI runs exactly the README's test command."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    block = re.search(r"## Two commands\n.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_has_a_main_and_a_test_command_that_exist():
    main, test = _readme_commands()
    assert (main, test) == ("bash scripts/main.sh", "bash scripts/test.sh")
    assert (ROOT / "scripts/main.sh").is_file() and (ROOT / "scripts/test.sh").is_file()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text()
    executed = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert executed == [f"exec {_readme_commands()[1]}"]
