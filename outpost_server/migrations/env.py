"""alembic's environment for the Outpost's revisions.

The Outpost (outpost_server.migrations) passes the connection to run on in
``config.attributes["connection"]``; the ``alembic`` command line (writing a revision)
opens ``sqlalchemy.url`` of alembic.ini instead.
"""

import asyncio

from alembic import context
from sqlalchemy.pool import NullPool

from outpost_server.migrations import VERSION_TABLE
from outpost_server.store import async_url, metadata

config = context.config
OPTIONS = dict(target_metadata=metadata, version_table=VERSION_TABLE, render_as_batch=True)


def run(connection) -> None:
    context.configure(connection=connection, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


async def run_on_url(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(async_url(url), poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    run(config.attributes["connection"])
else:
    asyncio.run(run_on_url(config.get_main_option("sqlalchemy.url")))
