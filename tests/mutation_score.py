"""Prints the mutation score of a `mutmut run` (its .mutmut-cache) and every survivor, each
with the reason it survives from tests/mutation_survivors.txt, or marked UNEXPLAINED.

Usage: python -m tests.mutation_score [DIR...]   (each DIR holds the .mutmut-cache of one shard of
`make mutate`; default: every build/mutate/shard-*)

A survivor is either killed by a new test or explained in that file: one line per kind,
`file | start of the mutated line | why no test kills it`. Lines are matched by their text,
not their number, so the file stays true while code moves.
"""

from __future__ import annotations

import pathlib
import sqlite3
import sys
from collections import Counter
from dataclasses import dataclass

KILLED = {"ok_killed", "ok_suspicious", "bad_timeout"}  # a timeout means the tests noticed
EXPLANATIONS = pathlib.Path(__file__).with_name("mutation_survivors.txt")


@dataclass(frozen=True)
class Explanation:
    filename: str
    line_start: str
    reason: str


def load_explanations(text: str) -> list[Explanation]:
    explanations = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        # The code may hold " | " itself: the file is before the first, the reason after the last.
        filename, _, rest = line.partition(" | ")
        line_start, _, reason = rest.rpartition(" | ")
        parts = [filename.strip(), line_start.strip(), reason.strip()]
        if not all(parts):
            raise ValueError(f"{EXPLANATIONS.name}:{number}: expected `file | line start | reason`: {line!r}")
        explanations.append(Explanation(parts[0], parts[1], parts[2]))
    return explanations


def reason_for(explanations: list[Explanation], filename: str, line: str) -> str | None:
    """The reason of the first explanation of `filename` whose text starts the stripped line."""
    stripped = line.strip()
    for explanation in explanations:
        if explanation.filename == filename and stripped.startswith(explanation.line_start):
            return explanation.reason
    return None


def read_mutants(cache: pathlib.Path) -> list[tuple[str, int, str, int, str]]:
    """(file, line number from 0, line text, mutant id, status) of every mutant in one cache."""
    # immutable: no lock, so a shard that is still running is never blocked by this read.
    with sqlite3.connect(f"{cache.resolve().as_uri()}?immutable=1", uri=True) as db:
        return db.execute(
            "SELECT SourceFile.filename, Line.line_number, Line.line, Mutant.id, Mutant.status "
            "FROM Mutant JOIN Line ON Mutant.line = Line.id JOIN SourceFile ON Line.sourcefile = SourceFile.id "
            "ORDER BY SourceFile.filename, Line.line_number"
        ).fetchall()


def main(argv: list[str]) -> int:
    directories = [pathlib.Path(arg) for arg in argv[1:]] or sorted(pathlib.Path("build/mutate").glob("shard-*"))
    caches = [directory / ".mutmut-cache" for directory in directories]
    missing = [str(cache) for cache in caches if not cache.exists()]
    if not caches or missing:
        print(f"no {', '.join(missing) or 'build/mutate/shard-*'}: run `make mutate` first", file=sys.stderr)
        return 2
    # A mutant is named by its shard and its id there: `cd SHARD && mutmut show ID`.
    mutants = {cache: read_mutants(cache) for cache in caches}
    # mutmut makes its mutants only after the unmutated tests pass: a shard with none has
    # either failed that run (it measured nothing) or is still in it.
    empty = [str(cache.parent) for cache, found in mutants.items() if not found]
    for directory in empty:
        print(f"{directory}: no mutant yet, its unmutated test run failed or is still running ({directory}/mutmut.log)")
    rows = sorted(
        (filename, number, line, f"{cache.parent}#{mutant_id}", status)
        for cache, found in mutants.items()
        for filename, number, line, mutant_id, status in found
    )
    tested = [row for row in rows if row[4] != "untested"]
    if not tested:
        print("no mutant tested yet")
        return 1
    explanations = load_explanations(EXPLANATIONS.read_text())
    killed = sum(1 for row in tested if row[4] in KILLED)
    per_file: Counter[str] = Counter()
    unexplained = 0
    for filename, number, line, mutant_id, status in tested:
        if status == "bad_survived":
            per_file[filename] += 1
            reason = reason_for(explanations, filename, line)
            unexplained += reason is None
            print(f"survived {mutant_id} {filename}:{number + 1}: {line.strip()}")
            print(f"    {reason or 'UNEXPLAINED'}")
    print("\nsurvivors per file: " + ", ".join(f"{f} {n}" for f, n in sorted(per_file.items())))
    score = 100 * killed / len(tested)
    print(f"mutation score: {killed}/{len(tested)} killed = {score:.1f}% ({len(rows) - len(tested)} untested)")
    print(f"survivors explained: {sum(per_file.values()) - unexplained}, unexplained: {unexplained}")
    return 1 if empty else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
