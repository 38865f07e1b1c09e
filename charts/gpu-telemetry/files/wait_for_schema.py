"""Wait until the database schema is at the Alembic head revision.

Runs as an init container of the collectors and the API, in the image's working
directory (the installed project), with DATABASE_URL set. Exits 0 once the
database's current revisions equal the heads of migrations/alembic.ini, and 1
when --timeout seconds pass first. With --database-only it waits only until the
database accepts connections.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

from telemetry.database import database_url_from_env, make_engine

logger = logging.getLogger("wait_for_schema")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="migrations/alembic.ini", help="Alembic configuration file")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait before failing")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between checks")
    parser.add_argument(
        "--database-only", action="store_true", help="wait for a connection only, not for the schema"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    heads = set(ScriptDirectory.from_config(Config(args.config)).get_heads())
    engine = make_engine(database_url_from_env())
    deadline = time.monotonic() + args.timeout
    state = "no connection yet"
    try:
        while time.monotonic() < deadline:
            try:
                with engine.connect() as connection:
                    current = set(MigrationContext.configure(connection).get_current_heads())
            except SQLAlchemyError as exc:
                state = f"database unavailable: {type(exc).__name__}"
            else:
                if args.database_only or current == heads:
                    logger.info("database ready at revision %s", ",".join(sorted(current)) or "none")
                    return 0
                state = f"schema at {sorted(current)}, waiting for {sorted(heads)}"
            logger.info("%s, checking again in %.0f s", state, args.interval)
            time.sleep(args.interval)
    finally:
        engine.dispose()
    logger.error(
        "timed out after %.0f s (%s): check the migration Job's logs and that DATABASE_URL names the right database",
        args.timeout,
        state,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
