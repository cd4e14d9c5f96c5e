"""CLIProxyAPI behind the upstream interface.

Its jobs are done where they always were, unchanged: keys are pre-made into the pool and the
whole list is pushed by pool.services.keys_reconcile (revoke, suspend and resume change the
key's status, and the next reconcile takes it off or puts it back, from escrow); its limits are
the portal's suspensions (usage.limits); its usage is popped, streamed or read as a snapshot by
usage.services and usage.stream. This driver only names those places, so that the code that
walks over upstreams can ask every kind the same questions.
"""

from __future__ import annotations

from typing import Any

from django.utils.translation import gettext as _

from pool.upstream import ProxyClient, UpstreamError
from pool.upstreams.base import Driver, Health, NewKey, RelayLimits, UsageRead


class CliproxyDriver(Driver):
    kind = "cliproxyapi"
    instant_keys = False

    def key_issue(self, **kwargs: Any) -> NewKey:
        raise NotImplementedError("CLIProxyAPI keys come from the pool (pool.services.key_assign)")

    def key_revoke(self, **kwargs: Any) -> None:
        # The key's status is what counts: keys_reconcile takes it off the proxy's list.
        from pool.services import keys_reconcile_quietly  # noqa: PLC0415

        keys_reconcile_quietly()

    def key_set_active(self, **kwargs: Any) -> None:
        from pool.services import keys_reconcile_quietly  # noqa: PLC0415

        keys_reconcile_quietly()

    def key_limits_push(self, *, key: Any, limits: RelayLimits) -> None:
        # CLIProxyAPI has no limits of its own: the portal suspends the key after each sync.
        return None

    def usage_read(self, **kwargs: Any) -> UsageRead:
        raise NotImplementedError("CLIProxyAPI usage is read by usage.services.usage_sync_pass")

    def health(self) -> Health:
        try:
            with ProxyClient.from_settings(budget=5) as client:
                enabled = client.usage_statistics_enabled()
        except UpstreamError as exc:
            return Health(False, str(exc))
        if not enabled:
            return Health(False, _("It answers, but its usage statistics are off: nothing is "
                                   "counted until they are on."))
        return Health(True, _("It answers with the management key."))
