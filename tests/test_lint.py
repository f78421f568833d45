"""Every `# noqa` in the project names the rule it silences and says why (ruff itself runs in CI, .ci/run)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOQA = re.compile(r"#\s*noqa\b(?P<rest>.*)$")
WITH_REASON = re.compile(r"^:\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*\s*(\(.+\)|-\s*\S.*)\s*$")


def noqa_lines():
    for folder in ("bench", "methods", "tests", "ledger", "docs", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                found = NOQA.search(line)
                if found and '"' not in line[found.start():]:  # not the pattern strings of this file
                    yield f"{path.relative_to(ROOT)}:{number}", found.group("rest")


def test_every_noqa_names_its_rule_and_a_reason():
    bare = [where for where, rest in noqa_lines() if not WITH_REASON.match(rest)]
    assert not bare, "# noqa without a rule and a reason, e.g. '# noqa: BLE001 (why)': " + ", ".join(bare)


def test_the_check_reads_a_bare_marker_as_bare():
    assert not WITH_REASON.match(": BLE001") and not WITH_REASON.match("")
    assert WITH_REASON.match(": BLE001 (a figure is not worth failing a report for)")
    assert WITH_REASON.match(": BLE001 - a figure is not worth failing a report for")
