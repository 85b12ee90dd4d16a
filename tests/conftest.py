import pathlib
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The project (components, tests), the job pipeline the images ship (images/common) and the
# reference backend (images/backend).
for path in (ROOT, ROOT / "images" / "common", ROOT / "images" / "backend"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.e2e import report

    if report.LINES:
        terminalreporter.section("end-to-end timings (benchmark figures, not asserts)")
        for line in report.LINES:
            terminalreporter.write_line(line)
