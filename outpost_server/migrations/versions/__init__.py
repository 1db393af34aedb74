# the revisions (alembic loads every module here but this one)
