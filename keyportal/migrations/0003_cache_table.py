"""The shared cache's table, created by `migrate`.

Every page and command reaches the cache (rate limits, the proxy-refusal latch), and with the
default database cache (CACHE_URL empty: `dbcache://keyportal_cache`) they all failed with "no
such table" until someone also ran `createcachetable`. This step runs Django's own
createcachetable for the database the migration runs on, so `migrate` alone leaves a working
portal.

It reads the *current* settings.CACHES on purpose: the table's name is configuration, not
schema history. A cache that is not a database cache (Redis, memcached, locmem) needs no
table and is skipped; a table that already exists (an install that ran createcachetable
before) is left as it is, so the step is safe to run on any existing database. Unapplying it
does nothing: the table holds only throw-away entries, and another database cache may share it.
"""

from __future__ import annotations

from django.core.management import call_command
from django.db import migrations


def create_cache_tables(apps, schema_editor) -> None:
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):

    dependencies = [
        ("keyportal", "0002_audit_log"),
    ]

    operations = [
        migrations.RunPython(create_cache_tables, migrations.RunPython.noop, elidable=False),
    ]
