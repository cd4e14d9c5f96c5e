"""Unissued pool keys are sealed at rest (pool.fields.SealedValueField): the column becomes
text without its unique index (key_hash is the unique one), and the values already there are
sealed in place. Going back writes them in clear again."""

from django.db import migrations

import pool.fields

BATCH = 500


def seal_values(apps, schema_editor):
    ApiKey = apps.get_model("pool", "ApiKey")
    rows = ApiKey.objects.filter(value__isnull=False).values_list("id", "value")
    # Read everything first: the reads open legacy plaintext as it is.
    pending = [(pk, value) for pk, value in rows.iterator() if value]
    for start in range(0, len(pending), BATCH):
        for pk, value in pending[start:start + BATCH]:
            ApiKey.objects.filter(pk=pk).update(value=value)


def unseal_values(apps, schema_editor):
    ApiKey = apps.get_model("pool", "ApiKey")
    table = ApiKey._meta.db_table
    plain = [(value, pk) for pk, value in
             ApiKey.objects.filter(value__isnull=False).values_list("id", "value") if value]
    with schema_editor.connection.cursor() as cursor:
        cursor.executemany(f"UPDATE {table} SET value = %s WHERE id = %s", plain)


class Migration(migrations.Migration):

    dependencies = [
        ('pool', '0004_apikey_fillfactor'),
    ]

    operations = [
        migrations.AlterField(
            model_name='apikey',
            name='value',
            field=pool.fields.SealedValueField(blank=True, editable=False, null=True),
        ),
        migrations.RunPython(seal_values, unseal_values),
    ]
