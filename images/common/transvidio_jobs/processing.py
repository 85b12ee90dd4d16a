"""The per-segment processing step, pluggable, and the reference step.

A job's upload is cut into one segment per second of video; each segment is processed
independently (in the backend for short jobs, by MPI ranks for long ones) and the
results are assembled in segment order. The translation models are the application's:
plug them in with TRANSVIDIO_SEGMENT_STEP=module:function, a function with the same
signature as `reference_step`.

The reference step does real, deterministic CPU work per segment (iterated SHA-256 over
the segment's bytes and the target language), so parallel speed-up is real and every
result can be checked by recomputing it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable
from typing import Any

SegmentStep = Callable[[bytes, int, str], dict[str, Any]]

ROUNDS = int(os.environ.get("TRANSVIDIO_SEGMENT_ROUNDS", "400000"))


def reference_step(segment: bytes, index: int, target_language: str) -> dict[str, Any]:
    digest = hashlib.sha256(segment + f"|{index}|{target_language}".encode()).digest()
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


def read_segment(path: str, duration_seconds: int, index: int) -> bytes:
    size = os.path.getsize(path)
    start, end = segment_bounds(size, duration_seconds, index)
    with open(path, "rb") as upload:
        upload.seek(start)
        return upload.read(end - start)


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
    upload = os.path.join(uploads_dir, job["upload_id"])
    if not os.path.isfile(upload):
        raise FileNotFoundError(f"upload {job['upload_id']} is missing")
    step = load_step()
    duration, language = int(job["duration_seconds"]), str(job["target_language"])
    segments = [
        {**step(read_segment(upload, duration, index), index, language), "rank": 0, "host": host}
        for index in range(duration)
    ]
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
