"""Entry point: ``telemetry-queue`` or ``python -m queue_server``."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from queue_server.auth import TokenFormatError
from queue_server.server import serve
from queue_server.settings import load_settings
from telemetry.process import configure_garbage_collector
from telemetry.settings import SettingsError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"telemetry-queue: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format=LOG_FORMAT, force=True)
    configure_garbage_collector()
    try:
        return asyncio.run(serve(settings))
    except (TokenFormatError, OSError) as exc:
        logging.getLogger("queue_server").error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
