from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pool.management.commands._proxy import proxy_client
from pool.services import pool_generate


class Command(BaseCommand):
    help = (
        "Generate N pool keys and push them to the proxy in one write, leaving the keys the "
        "portal does not own untouched."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=int, required=True, help="how many keys to create")

    def handle(self, *args: Any, count: int, **options: Any) -> None:
        if count < 1 or count > 100_000:
            raise CommandError("--count must be between 1 and 100000.")

        def progress(done: int, total: int) -> None:
            self.stdout.write(f"  created {done}/{total} keys")

        with proxy_client() as client:
            report = pool_generate(count=count, client=client, progress=progress)
        for line in report.lines():
            self.stdout.write(line)
