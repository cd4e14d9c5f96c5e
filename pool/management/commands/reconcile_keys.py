from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.translation import gettext as _

from pool.management.commands._proxy import proxy_client
from pool.services import keys_reconcile
from pool.upstreams.registry import cliproxyapi_endpoint, relays
from pool.upstreams.relays import relays_reconcile


class Command(BaseCommand):
    help = (
        "Make the proxy's key list match the portal (pool and active keys present; revoked, "
        "suspended and expired keys absent; foreign keys untouched; never empty) and refill "
        "the pool below PORTAL_POOL_MIN."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="say what would change, change nothing"
        )
        parser.add_argument(
            "--force", action="store_true",
            help="take the proxy's list as it is even when it lacks all or most of the keys "
                 "the portal put there (the proxy was really reset): push the pool keys again "
                 "and mark the lost issued keys missing",
        )

    def handle(self, *args: Any, dry_run: bool, force: bool, **options: Any) -> None:
        # Each relay that makes its own keys first: one that does not answer is reported and
        # the others go on; the run then exits non-zero.
        failed = False
        for relay in relays_reconcile(dry_run=dry_run):
            for line in relay.lines():
                self.stdout.write(line)
            failed = failed or bool(relay.errors)
        if cliproxyapi_endpoint().management_url or not relays():
            # A refused list ends the command with its sentence and a non-zero exit.
            with proxy_client() as client:
                report = keys_reconcile(client=client, dry_run=dry_run, force=force)
            for line in report.lines():
                self.stdout.write(line)
        if failed:
            raise CommandError(_("Some changes could not be made at an upstream; they are "
                                 "made at the next run."))
