"""Test-only: the Prefect API process (``python -m uvicorn`` with PREFECT__SERVER_EPHEMERAL=1) starts
``$REALS_TEST_API_DELAY`` seconds late, as on a busy machine; every other process is untouched."""
import os
import sys
import time

if os.environ.get("PREFECT__SERVER_EPHEMERAL") == "1" and "uvicorn" in sys.orig_argv:
    time.sleep(float(os.environ.get("REALS_TEST_API_DELAY", "30")))
