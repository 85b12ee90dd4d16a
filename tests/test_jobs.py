"""The job pipeline's pure parts: segmenting, the reference step, assembling results."""

from __future__ import annotations

import itertools
import json
import pathlib
from typing import Any

import pytest
from transvidio_jobs import processing


def test_segments_cover_the_upload_exactly_once() -> None:
    for size, duration in ((1000, 7), (5, 120), (10**6, 60)):
        bounds = [processing.segment_bounds(size, duration, i) for i in range(duration)]
        assert bounds[0][0] == 0 and bounds[-1][1] == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


def test_the_reference_step_is_deterministic_and_depends_on_its_inputs() -> None:
    first = processing.reference_step(b"segment", 3, "fr")
    assert first == processing.reference_step(b"segment", 3, "fr")
    assert first != processing.reference_step(b"segment", 3, "de")
    assert first != processing.reference_step(b"segment", 4, "fr")
    assert first != processing.reference_step(b"other", 3, "fr")


def test_assembling_orders_segments_whatever_the_rank_order() -> None:
    segments = [{"index": i, "digest": f"{i:02x}", "rank": i % 3} for i in (4, 0, 3, 1, 2)]
    result = processing.assemble("job", "fr", segments)
    assert [s["index"] for s in result["segments"]] == [0, 1, 2, 3, 4]
    assert result["digest"] == processing.assemble("job", "fr", sorted(segments, key=lambda s: s["index"]))["digest"]


def test_run_locally_writes_a_verifiable_result(tmp_path: pathlib.Path) -> None:
    uploads, outputs = tmp_path / "uploads", tmp_path / "outputs"
    uploads.mkdir()
    (uploads / "u1").write_bytes(bytes(range(256)) * 10)
    job = {"id": "j1", "upload_id": "u1", "duration_seconds": 5, "target_language": "fr"}
    path = processing.run_locally(job, str(uploads), str(outputs), "backend-1")
    result = json.loads((outputs / path).read_text())
    assert path == "j1/result.json"
    assert len(result["segments"]) == 5 and result["ranks"] == 1
    assert {(segment["rank"], segment["host"]) for segment in result["segments"]} == {(0, "backend-1")}
    for segment in result["segments"]:
        data = processing.read_segment(str(uploads / "u1"), 5, segment["index"])
        assert segment["digest"] == processing.reference_step(data, segment["index"], "fr")["digest"]


def test_a_failure_reason_is_stored_without_control_bytes() -> None:
    from transvidio_jobs import queue

    assert queue._printable("mpirun\x00 failed:\n\tssh\x1b[0m") == "mpirun failed:\n\tssh[0m"


def test_the_result_line_survives_the_bytes_mpirun_adds() -> None:
    assert processing.last_output_line('warning\n{"size": 2}\n\x00') == '{"size": 2}'
    assert processing.last_output_line('{"a": 1}\n\n') == '{"a": 1}'
    try:
        processing.last_output_line("\x00\n")
    except ValueError as error:
        assert "nothing" in str(error)
    else:
        raise AssertionError("an output with no text must be refused")


def test_the_result_digest_covers_every_segment_in_order_and_the_file_is_world_readable(
    tmp_path: pathlib.Path,
) -> None:
    import hashlib
    import os
    import stat

    segments: list[dict[str, Any]] = [{"index": i, "digest": f"{i:064x}"} for i in (2, 0, 1)]
    result = processing.assemble("job", "fr", segments)
    in_order = "".join(f"{i:064x}" for i in (0, 1, 2))
    expected: dict[str, Any] = {"job_id": "job", "target_language": "fr"}
    expected["segments"] = [segments[1], segments[2], segments[0]]
    expected["digest"] = hashlib.sha256(in_order.encode()).hexdigest()
    assert result == expected
    path = processing.write_result(str(tmp_path), "job", result)
    written = tmp_path / path
    assert json.loads(written.read_text()) == result
    # nginx (another user) serves it; no temporary file is left beside it.
    assert stat.S_IMODE(os.stat(written).st_mode) == 0o644
    assert os.listdir(tmp_path / "job") == ["result.json"]


def test_a_custom_segment_step_is_loaded_from_the_environment(monkeypatch: Any) -> None:
    monkeypatch.delenv("TRANSVIDIO_SEGMENT_STEP", raising=False)
    assert processing.load_step() is processing.reference_step
    monkeypatch.setenv("TRANSVIDIO_SEGMENT_STEP", "transvidio_jobs.processing:segment_bounds")
    assert processing.load_step() is processing.segment_bounds  # type: ignore[comparison-overlap]


def test_a_segment_is_exactly_its_byte_range(tmp_path: pathlib.Path) -> None:
    upload = tmp_path / "u"
    upload.write_bytes(bytes(range(100)))
    assert processing.segment_bounds(100, 3, 1) == (33, 66)
    assert processing.read_segment(str(upload), 3, 1) == bytes(range(33, 66))
    assert processing.read_segment(str(upload), 3, 2) == bytes(range(66, 100))


def test_a_job_whose_upload_is_gone_fails_naming_it(tmp_path: pathlib.Path) -> None:
    job = {"id": "j1", "upload_id": "u404", "duration_seconds": 5, "target_language": "fr"}
    with pytest.raises(FileNotFoundError) as raised:
        processing.run_locally(job, str(tmp_path), str(tmp_path / "outputs"), "backend-1")
    assert str(raised.value) == "upload u404 is missing"
    assert not (tmp_path / "outputs").exists()


def test_an_mpirun_that_printed_nothing_is_an_error_saying_so() -> None:
    with pytest.raises(ValueError) as raised:
        processing.last_output_line("\x00\n  \n")
    assert str(raised.value) == "mpirun printed nothing"
