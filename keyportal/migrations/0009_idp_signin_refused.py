# The audit log's "sign-in refused" action (a refused identity-provider sign-in).

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('keyportal', '0008_audit_proxy_admin_actions'),
    ]

    operations = [
        migrations.AlterField(
            model_name='auditevent',
            name='action',
            field=models.CharField(choices=[('sign_in', 'signed in'), ('sign_in_refused', 'sign-in refused'), ('key_issued', 'key issued'), ('key_revoked', 'key revoked'), ('key_suspended', 'key suspended'), ('key_restored', 'key restored'), ('key_expired', 'key expired'), ('limits_changed', 'limits changed'), ('pool_generated', 'pool keys generated'), ('reconcile_run', 'proxy reconciled'), ('token_created', 'API token created'), ('token_revoked', 'API token revoked'), ('prices_recomputed', 'cost recomputed'), ('person_deactivated', 'person deactivated'), ('person_reactivated', 'person reactivated'), ('admin_login_throttled', 'admin sign-in refused (too many failures)'), ('totp_enabled', 'authenticator app set up'), ('totp_disabled', 'authenticator app removed'), ('totp_failed', 'wrong authenticator code'), ('price_changed', 'model price changed'), ('display_currency_changed', 'display currency changed'), ('key_renamed', 'key renamed'), ('proxy_setting_changed', 'proxy setting changed'), ('proxy_upstream_changed', 'proxy upstream account changed'), ('proxy_auth_file_changed', 'proxy auth file changed')], db_index=True, max_length=32, verbose_name='action'),
        ),
    ]
