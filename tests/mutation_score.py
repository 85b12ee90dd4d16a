"""Prints the mutation score of a `mutmut run` (its .mutmut-cache) and every survivor.

Usage: python -m tests.mutation_score [DIR]   (DIR holds .mutmut-cache; default: build/mutate)
"""

from __future__ import annotations

import pathlib
import sqlite3
import sys
from collections import Counter

KILLED = {"ok_killed", "ok_suspicious", "bad_timeout"}  # a timeout means the tests noticed


def main(argv: list[str]) -> int:
    directory = pathlib.Path(argv[1] if len(argv) > 1 else "build/mutate")
    cache = directory / ".mutmut-cache"
    if not cache.exists():
        print(f"no {cache}: run `make mutate` first", file=sys.stderr)
        return 2
    with sqlite3.connect(cache) as db:
        rows = db.execute(
            "SELECT SourceFile.filename, Line.line_number, Line.line, Mutant.id, Mutant.status "
            "FROM Mutant JOIN Line ON Mutant.line = Line.id JOIN SourceFile ON Line.sourcefile = SourceFile.id "
            "ORDER BY SourceFile.filename, Line.line_number"
        ).fetchall()
    tested = [row for row in rows if row[4] != "untested"]
    if not tested:
        print("no mutant tested yet")
        return 1
    killed = sum(1 for row in tested if row[4] in KILLED)
    per_file: Counter[str] = Counter()
    for filename, number, line, mutant_id, status in tested:
        if status == "bad_survived":
            per_file[filename] += 1
            print(f"survived #{mutant_id} {filename}:{number + 1}: {line.strip()}")
    print("\nsurvivors per file: " + ", ".join(f"{f} {n}" for f, n in sorted(per_file.items())))
    score = 100 * killed / len(tested)
    print(f"mutation score: {killed}/{len(tested)} killed = {score:.1f}% ({len(rows) - len(tested)} untested)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
