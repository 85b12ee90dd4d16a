"""The job pipeline's pure parts: segmenting, the reference step, assembling results, and
how an upload is opened (by owner and id, never through a symbolic link)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from transvidio_jobs import processing


def test_segments_cover_the_upload_exactly_once() -> None:
    for size, duration in ((1000, 7), (5, 120), (10**6, 60)):
        bounds = [processing.segment_bounds(size, duration, i) for i in range(duration)]
        assert bounds[0][0] == 0 and bounds[-1][1] == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


def test_the_reference_step_is_deterministic_and_depends_on_its_inputs() -> None:
    first = processing.reference_step([b"segment"], 3, "fr")
    assert first == processing.reference_step([b"seg", b"ment"], 3, "fr")  # however it is chunked
    assert first != processing.reference_step([b"segment"], 3, "de")
    assert first != processing.reference_step([b"segment"], 4, "fr")
    assert first != processing.reference_step([b"other"], 3, "fr")


def test_the_reference_step_is_iterated_sha256_over_the_segment_index_and_language(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processing, "ROUNDS", 3)
    digest = hashlib.sha256(b"segment|3|fr").digest()
    for _ in range(3):
        digest = hashlib.sha256(digest).digest()
    assert processing.reference_step([b"seg", b"ment"], 3, "fr") == {"index": 3, "digest": digest.hex()}


UPLOAD = "0123456789abcdef" * 2


def write_upload(uploads: pathlib.Path, data: bytes, owner: str = "alice", upload_id: str = UPLOAD) -> pathlib.Path:
    (uploads / owner).mkdir(parents=True, exist_ok=True)
    (uploads / owner / upload_id).write_bytes(data)
    return uploads / owner / upload_id


def segment(uploads: pathlib.Path, duration: int, index: int) -> bytes:
    descriptor = processing.open_upload(str(uploads), "alice", UPLOAD)
    try:
        return b"".join(processing.segment_chunks(descriptor, duration, index))
    finally:
        os.close(descriptor)


def test_assembling_orders_segments_whatever_the_rank_order() -> None:
    segments = [{"index": i, "digest": f"{i:02x}", "rank": i % 3} for i in (4, 0, 3, 1, 2)]
    result = processing.assemble("job", "fr", segments)
    assert [s["index"] for s in result["segments"]] == [0, 1, 2, 3, 4]
    assert result["digest"] == processing.assemble("job", "fr", sorted(segments, key=lambda s: s["index"]))["digest"]


def test_run_locally_writes_a_verifiable_result(tmp_path: pathlib.Path) -> None:
    uploads, outputs = tmp_path / "uploads", tmp_path / "outputs"
    write_upload(uploads, bytes(range(256)) * 10)
    job = {"id": "j1", "owner": "alice", "upload_id": UPLOAD, "duration_seconds": 5, "target_language": "fr"}
    path = processing.run_locally(job, str(uploads), str(outputs), "backend-1")
    result = json.loads((outputs / path).read_text())
    assert path == "j1/result.json"
    assert len(result["segments"]) == 5 and result["ranks"] == 1
    assert {(segment["rank"], segment["host"]) for segment in result["segments"]} == {(0, "backend-1")}
    for part in result["segments"]:
        data = (bytes(range(256)) * 10)[512 * part["index"] : 512 * (part["index"] + 1)]
        assert part["digest"] == processing.reference_step([data], part["index"], "fr")["digest"]


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
    write_upload(tmp_path, bytes(range(100)))
    assert processing.segment_bounds(100, 3, 1) == (33, 66)
    assert segment(tmp_path, 3, 1) == bytes(range(33, 66))
    assert segment(tmp_path, 3, 2) == bytes(range(66, 100))


def test_a_segment_arrives_in_chunks_of_at_most_chunk_bytes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 500 MB upload processed as a one-second job is one 500 MB segment: never read whole.
    monkeypatch.setattr(processing, "CHUNK_BYTES", 10)
    write_upload(tmp_path, bytes(range(95)))
    descriptor = processing.open_upload(str(tmp_path), "alice", UPLOAD)
    chunks = list(processing.segment_chunks(descriptor, 1, 0))
    os.close(descriptor)
    assert [len(c) for c in chunks] == [10] * 9 + [5]
    assert b"".join(chunks) == bytes(range(95))


def test_the_step_sees_its_segment_only_as_chunks_it_pulls(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []

    def counting_step(chunks: Iterator[bytes], index: int, language: str) -> dict[str, Any]:
        assert not isinstance(chunks, (bytes, list))  # a stream, not the segment in memory
        seen.extend(len(chunk) for chunk in chunks)
        return {"index": index, "digest": "x"}

    monkeypatch.setattr(processing, "CHUNK_BYTES", 8)
    monkeypatch.setattr(processing, "load_step", lambda: counting_step)
    write_upload(tmp_path, b"y" * 20)
    descriptor = processing.open_upload(str(tmp_path), "alice", UPLOAD)
    result = processing.process_segments(descriptor, 2, "fr", [1], rank=2, host="mpi-worker-1")
    os.close(descriptor)
    assert seen == [8, 2]
    assert result == [{"index": 1, "digest": "x", "rank": 2, "host": "mpi-worker-1"}]


def test_a_job_whose_upload_is_gone_fails_naming_it(tmp_path: pathlib.Path) -> None:
    (tmp_path / "alice").mkdir()
    job = {"id": "j1", "owner": "alice", "upload_id": "f" * 32, "duration_seconds": 5, "target_language": "fr"}
    with pytest.raises(FileNotFoundError) as raised:
        processing.run_locally(job, str(tmp_path), str(tmp_path / "outputs"), "backend-1")
    assert str(raised.value) == f"upload {'f' * 32} is missing"
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("owner", "upload_id"),
    [("../alice", UPLOAD), ("alice", "../" + UPLOAD[3:]), ("alice", UPLOAD + "\n"), ("Alice", UPLOAD), ("", UPLOAD)],
)
def test_an_upload_reference_that_is_not_an_owner_and_an_id_is_refused(
    tmp_path: pathlib.Path, owner: str, upload_id: str
) -> None:
    write_upload(tmp_path, b"data")
    with pytest.raises(ValueError) as raised:
        processing.open_upload(str(tmp_path), owner, upload_id)
    assert str(raised.value) == f"refused upload reference {owner!r}/{upload_id!r}"


def test_an_upload_or_owner_directory_that_is_a_symbolic_link_is_never_followed(tmp_path: pathlib.Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"the runner must not read this")
    uploads = tmp_path / "uploads"
    (uploads / "alice").mkdir(parents=True)
    (uploads / "alice" / UPLOAD).symlink_to(secret)
    with pytest.raises(OSError) as raised:
        processing.open_upload(str(uploads), "alice", UPLOAD)
    assert raised.value.errno == 40  # ELOOP: O_NOFOLLOW on the upload
    (uploads / "mallory").symlink_to(uploads / "alice")
    write_upload(tmp_path / "real", b"x", owner="bob")
    (uploads / "bob").symlink_to(tmp_path / "real" / "bob")
    with pytest.raises(OSError) as raised:
        processing.open_upload(str(uploads), "bob", UPLOAD)
    assert raised.value.errno in (20, 40)  # ENOTDIR or ELOOP: O_NOFOLLOW on the owner's directory


def test_an_upload_that_is_not_a_regular_file_is_refused(tmp_path: pathlib.Path) -> None:
    (tmp_path / "alice" / UPLOAD).mkdir(parents=True)
    with pytest.raises(ValueError, match=f"^upload {UPLOAD} is not a regular file$"):
        processing.open_upload(str(tmp_path), "alice", UPLOAD)
    os.mkfifo(tmp_path / "alice" / ("e" * 32))
    with pytest.raises(ValueError, match="is not a regular file"):
        processing.open_upload(str(tmp_path), "alice", "e" * 32)


def test_an_mpirun_that_printed_nothing_is_an_error_saying_so() -> None:
    with pytest.raises(ValueError) as raised:
        processing.last_output_line("\x00\n  \n")
    assert str(raised.value) == "mpirun printed nothing"
