"""The exporter child's reading of the proxy's pipe: batches whole, however the reads split them."""

from __future__ import annotations

import os
import threading
from typing import Any

import orjson

from meterproxy.otel_export import read_batches


class Collected:
    """Stands in for the exporter: what `read_batches` hands it, and never a due export."""

    def __init__(self) -> None:
        self.batches: list[Any] = []

    def due(self) -> float:
        return 60.0

    def add(self, batch: Any) -> None:
        self.batches.append(batch)


def test_batches_split_over_many_reads_and_several_per_read_arrive_whole() -> None:
    big = [{"id": f"r{i}", "tokens": [i, i + 1, 0, 0, 0], "note": "x" * 200} for i in range(3_000)]
    small = [[{"id": "a"}], [{"id": "b"}], [{"id": "c"}]]
    wire = (
        orjson.dumps(big)
        + b"\n"
        + b"".join(orjson.dumps(b) + b"\n" for b in small)
        + b"not json\n"
        + orjson.dumps(big[:2])
        + b"\n"
    )
    read_fd, write_fd = os.pipe()

    def write() -> None:
        # Uneven pieces: a line's end falls inside a piece, at its start and at its end.
        at, step = 0, 1
        while at < len(wire):
            os.write(write_fd, wire[at : at + step])
            at += step
            step = step * 7 % 65_521 + 1
        os.close(write_fd)

    writer = threading.Thread(target=write)
    writer.start()
    exporter = Collected()
    try:
        read_batches(read_fd, exporter)  # type: ignore[arg-type]
    finally:
        writer.join()
        os.close(read_fd)
    assert exporter.batches == [big, *small, big[:2]]  # the unreadable line skipped, nothing else lost
