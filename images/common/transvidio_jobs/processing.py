"""The per-segment processing step, pluggable, and the reference step.

A job's upload is cut into one segment per second of video; each segment is processed
independently (in the backend for short jobs, by MPI ranks for long ones) and the
results are assembled in segment order. The translation models are the application's:
plug them in with TRANSVIDIO_SEGMENT_STEP=module:function, a function with the same
signature as `reference_step`. A step gets its segment as chunks of at most CHUNK_BYTES,
so a 500 MB upload processed as a one-second job never sits in memory whole.

The reference step does real, deterministic CPU work per segment (iterated SHA-256 over
the segment's bytes and the target language), so parallel speed-up is real and every
result can be checked by recomputing it.

Uploads are opened only by owner and id, each checked against its pattern, without
following a symbolic link at either level: a path from the database is never trusted.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import Any

SegmentStep = Callable[[Iterable[bytes], int, str], dict[str, Any]]

ROUNDS = int(os.environ.get("TRANSVIDIO_SEGMENT_ROUNDS", "400000"))
CHUNK_BYTES = 1024 * 1024
# An upload's owner is an API token's name; its id is what POST /api/uploads returned.
OWNER_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}")


def reference_step(chunks: Iterable[bytes], index: int, target_language: str) -> dict[str, Any]:
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    hasher.update(f"|{index}|{target_language}".encode())
    digest = hasher.digest()
    for _ in range(ROUNDS):
        digest = hashlib.sha256(digest).digest()
    return {"index": index, "digest": digest.hex()}


def load_step() -> SegmentStep:
    spec = os.environ.get("TRANSVIDIO_SEGMENT_STEP")
    if not spec:
        return reference_step
    module, _, name = spec.partition(":")
    step: SegmentStep = getattr(importlib.import_module(module), name)
    return step


def segment_bounds(size: int, duration_seconds: int, index: int) -> tuple[int, int]:
    """Byte range of segment `index` of a `size`-byte upload cut into `duration_seconds` parts."""
    return size * index // duration_seconds, size * (index + 1) // duration_seconds


def open_upload(uploads_dir: str, owner: str, upload_id: str) -> int:
    """A read-only descriptor of `uploads_dir/owner/upload_id`: both names checked whole,
    neither followed if it is a symbolic link, and the upload a regular file."""
    if not OWNER_RE.fullmatch(owner) or not UPLOAD_ID_RE.fullmatch(upload_id):
        raise ValueError(f"refused upload reference {owner!r}/{upload_id!r}")
    directory = os.open(os.path.join(uploads_dir, owner), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            # O_NONBLOCK: a FIFO planted in its place must not hang the reader.
            descriptor = os.open(upload_id, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
        except FileNotFoundError:
            raise FileNotFoundError(f"upload {upload_id} is missing") from None
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise ValueError(f"upload {upload_id} is not a regular file")
    return descriptor


def segment_chunks(descriptor: int, duration_seconds: int, index: int) -> Iterator[bytes]:
    """Segment `index` of an open upload, in chunks of at most CHUNK_BYTES."""
    start, end = segment_bounds(os.fstat(descriptor).st_size, duration_seconds, index)
    while start < end:
        chunk = os.pread(descriptor, min(CHUNK_BYTES, end - start), start)
        if not chunk:
            return
        start += len(chunk)
        yield chunk


def process_segments(
    descriptor: int, duration_seconds: int, language: str, indices: Iterable[int], rank: int, host: str
) -> list[dict[str, Any]]:
    """The step over each of `indices`, each result tagged with who computed it."""
    step = load_step()
    return [
        {**step(segment_chunks(descriptor, duration_seconds, index), index, language), "rank": rank, "host": host}
        for index in indices
    ]


def assemble(job_id: str, target_language: str, segments: list[dict[str, Any]]) -> dict[str, Any]:
    """The job's result: every segment in order, and one digest over all of them."""
    ordered = sorted(segments, key=lambda s: s["index"])
    combined = hashlib.sha256("".join(s["digest"] for s in ordered).encode()).hexdigest()
    return {"job_id": job_id, "target_language": target_language, "segments": ordered, "digest": combined}


def write_result(outputs_dir: str, job_id: str, result: dict[str, Any]) -> str:
    """Writes outputs/<job id>/result.json atomically; returns its path relative to outputs."""
    directory = os.path.join(outputs_dir, job_id)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".result.{os.getpid()}.tmp")
    with open(temporary, "w") as out:
        json.dump(result, out, sort_keys=True)
    os.chmod(temporary, 0o644)
    os.replace(temporary, os.path.join(directory, "result.json"))
    return f"{job_id}/result.json"


def run_locally(job: dict[str, Any], uploads_dir: str, outputs_dir: str, host: str) -> str:
    """A short job, every segment in this process; returns the result path."""
    descriptor = open_upload(uploads_dir, str(job["owner"]), str(job["upload_id"]))
    try:
        duration, language = int(job["duration_seconds"]), str(job["target_language"])
        segments = process_segments(descriptor, duration, language, range(duration), rank=0, host=host)
    finally:
        os.close(descriptor)
    result = assemble(str(job["id"]), language, segments)
    result["ranks"] = 1
    return write_result(outputs_dir, str(job["id"]), result)


def last_output_line(output: str) -> str:
    """The last line an MPI program printed, whatever mpirun adds around it.

    PRRTE can end its forwarded output with a NUL byte (seen on Docker); a result line
    is the last line that still has text once such bytes are gone.
    """
    lines = [line.strip() for line in output.replace("\x00", "").splitlines()]
    printed = [line for line in lines if line]
    if not printed:
        raise ValueError("mpirun printed nothing")
    return printed[-1]
