"""The flows. Settings Prefect reads when it is first imported are given defaults here."""

import os

# Runs with no Prefect server start a temporary one. Its default start-up limit (20 s) is
# missed on a busy 2-core machine; offline, its telemetry only logs errors.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
