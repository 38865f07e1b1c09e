"""Deterministic generator of DCGM exporter CSV dumps, for tests, demos and benchmarks.

The output has the exporter's header and quoting: every field quoted, ``labels_raw``
a comma-separated list of ``key="value"`` pairs. The same arguments and seed always
give the same bytes. Run ``python -m streamer.sample --help`` for the options.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from streamer.dcgm_csv import EXPORTER_COLUMNS

__all__ = ["HEADER", "METRICS", "SampleSpec", "generate_rows", "write_sample", "main"]

HEADER = EXPORTER_COLUMNS

#: The ten DCGM fields of a dump with their value ranges and whether they are integers.
#: Ranges are those of an 80 GB H100: utilisation in %, power in W, temperature in °C,
#: frame buffer in MiB, clocks in MHz.
METRICS: dict[str, tuple[float, float, bool]] = {
    "DCGM_FI_DEV_GPU_UTIL": (0, 100, True),
    "DCGM_FI_DEV_MEM_COPY_UTIL": (0, 100, True),
    "DCGM_FI_DEV_POWER_USAGE": (60.0, 700.0, False),
    "DCGM_FI_DEV_GPU_TEMP": (25, 85, True),
    "DCGM_FI_DEV_FB_USED": (0, 81559, True),
    "DCGM_FI_DEV_FB_FREE": (0, 81559, True),
    "DCGM_FI_DEV_DEC_UTIL": (0, 100, True),
    "DCGM_FI_DEV_ENC_UTIL": (0, 100, True),
    "DCGM_FI_DEV_SM_CLOCK": (345, 1980, True),
    "DCGM_FI_DEV_MEM_CLOCK": (1593, 2619, True),
}

FRAME_BUFFER_MIB = 81559
MODEL_NAME = "NVIDIA H100 80GB HBM3"
DRIVER_VERSION = "535.129.03"


@dataclass(frozen=True, slots=True)
class SampleSpec:
    """Shape of a generated dump: ``hosts`` hosts of ``gpus_per_host`` GPUs, ``scrapes`` scrapes one second apart."""

    hosts: int = 4
    gpus_per_host: int = 8
    scrapes: int = 1
    seed: int = 0
    host_prefix: str = "sim-dgx-"
    start: datetime = datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)


def generate_rows(spec: SampleSpec) -> Iterator[tuple[str, ...]]:
    """Yield the data rows of a dump (without the header), grouped by scrape and metric."""
    rng = random.Random(spec.seed)
    gpus = [
        (f"{spec.host_prefix}{host + 1:03d}", gpu, str(uuid.UUID(int=rng.getrandbits(128), version=4)))
        for host in range(spec.hosts)
        for gpu in range(spec.gpus_per_host)
    ]
    for scrape in range(spec.scrapes):
        moment = (spec.start + timedelta(seconds=scrape)).strftime("%Y-%m-%dT%H:%M:%SZ")
        used = {gpu_uuid: rng.randint(0, FRAME_BUFFER_MIB) for _, _, gpu_uuid in gpus}
        for metric, (low, high, integer) in METRICS.items():
            for hostname, gpu, gpu_uuid in gpus:
                if metric == "DCGM_FI_DEV_FB_USED":
                    value = str(used[gpu_uuid])
                elif metric == "DCGM_FI_DEV_FB_FREE":
                    value = str(FRAME_BUFFER_MIB - used[gpu_uuid])
                elif integer:
                    value = str(rng.randint(int(low), int(high)))
                else:
                    value = f"{rng.uniform(low, high):.3f}"
                yield _row(moment, metric, hostname, gpu, f"GPU-{gpu_uuid}", value)


def _row(moment: str, metric: str, hostname: str, gpu: int, gpu_uuid: str, value: str) -> tuple[str, ...]:
    labels = {
        "DCGM_FI_DRIVER_VERSION": DRIVER_VERSION,
        "Hostname": hostname,
        "UUID": gpu_uuid,
        "__name__": metric,
        "device": f"nvidia{gpu}",
        "gpu": str(gpu),
        "instance": f"{hostname}:9400",
        "job": "dgx_dcgm_exporter",
        "modelName": MODEL_NAME,
    }
    labels_raw = ",".join(f'{key}="{text}"' for key, text in labels.items())
    return (moment, metric, str(gpu), f"nvidia{gpu}", gpu_uuid, MODEL_NAME, hostname, "", "", "", value, labels_raw)


def write_sample(output: TextIO, spec: SampleSpec) -> int:
    """Write a whole dump to ``output`` (opened with ``newline=""``); return the number of data rows."""
    writer = csv.writer(output, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(HEADER)
    count = 0
    for row in generate_rows(spec):
        writer.writerow(row)
        count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write a generated dump to a file or standard output."""
    parser = argparse.ArgumentParser(
        prog="python -m streamer.sample",
        description="Write a deterministic DCGM exporter CSV dump (10 metrics per GPU per scrape).",
    )
    parser.add_argument("--hosts", type=int, default=4, help="number of hosts (default 4)")
    parser.add_argument("--gpus-per-host", type=int, default=8, help="GPUs on each host (default 8)")
    parser.add_argument("--scrapes", type=int, default=1, help="scrapes, one second apart (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same file")
    parser.add_argument("--host-prefix", default="sim-dgx-", help="hostname prefix (default sim-dgx-)")
    parser.add_argument("--output", "-o", type=Path, help="file to write (default: standard output)")
    args = parser.parse_args(argv)
    for name in ("hosts", "gpus_per_host", "scrapes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    spec = SampleSpec(
        hosts=args.hosts,
        gpus_per_host=args.gpus_per_host,
        scrapes=args.scrapes,
        seed=args.seed,
        host_prefix=args.host_prefix,
    )
    if args.output is None:
        write_sample(sys.stdout, spec)
        return 0
    with args.output.open("w", encoding="utf-8", newline="") as output:
        count = write_sample(output, spec)
    print(f"wrote {count} rows to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
