"""`manage.py send_notifications`: sends the webhook deliveries that are due (cron).

Safe beside the portal's own workers and other runs: each row is claimed before it is sent.
Exits 1 when a delivery was given up on in this run, so cron mail shows it. Also deletes
finished deliveries older than PORTAL_WEBHOOK_KEEP_DAYS."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import gettext as _

from keyportal.notify import deliver_due, deliveries_prune


class Command(BaseCommand):
    help = _("Send the team chat webhook deliveries that are due (new ones and retries).")

    def handle(self, *args: Any, **options: Any) -> None:
        total = deliver_due(limit=1000)
        pruned = deliveries_prune()
        if pruned:
            self.stdout.write(_("%(n)d old deliveries deleted.") % {"n": pruned})
        self.stdout.write(_("Webhooks: %(sent)d sent, %(retrying)d to retry, %(failed)d given up.")
                          % {"sent": total.sent, "retrying": total.retrying,
                             "failed": total.failed})
        if total.failed:
            raise CommandError(_("%(count)d webhook deliveries failed for good: see Deliveries "
                                 "in the admin.") % {"count": total.failed})
