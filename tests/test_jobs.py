"""The job pipeline's pure parts: segmenting, the reference step, assembling results."""

from __future__ import annotations

import itertools
import json
import pathlib

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
