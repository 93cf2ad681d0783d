"""Prefect settings for a quiet, self-contained local mode.

Prefect reads its settings when it is imported, so every flow module imports this first. Each
value is only a default: a variable already set (PREFECT_API_URL for a real server, say) wins.
"""

import os
from pathlib import Path

LOCAL_DEFAULTS = {
    "PREFECT_HOME": str(Path.cwd() / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "DVC_NO_ANALYTICS": "1",
}

for key, value in LOCAL_DEFAULTS.items():
    os.environ.setdefault(key, value)
