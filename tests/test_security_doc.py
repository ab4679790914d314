"""SECURITY.md stays honest: every attack row says prevented, detected or open, and every row
that claims prevented or detected names tests that exist (files, and test functions in them)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rows() -> list[list[str]]:
    text = (REPO / "SECURITY.md").read_text()
    table = text[text.index("## Attacks and their status"):]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if re.match(r"^\| \d+ \|", line)]


def test_every_row_has_a_status_and_every_claim_names_existing_tests():
    rows = _rows()
    assert len(rows) >= 10
    for num, _who, _attack, status, shown_by in rows:
        kind = re.search(r"\*\*(prevented|detected|open)\*\*", status)
        assert kind, f"row {num}: no **prevented** / **detected** / **open** in {status!r}"
        refs = re.findall(r"`((?:tests|benchmarks)/[\w/]+\.py)?((?:::\w+)?)`", shown_by)  # in order
        if kind.group(1) == "open":
            continue
        assert any(path for path, _ in refs), f"row {num} claims {kind.group(1)} but names no test"
        file = None
        for path, func in refs:
            if path:  # a file; a bare `::name` continues the file named before it
                file = REPO / path
                assert file.exists(), f"row {num}: {path} does not exist"
            if func:
                assert file is not None and re.search(rf"^def {func[2:]}\(", file.read_text(), re.M), \
                    f"row {num}: no {func[2:]} in {file}"
