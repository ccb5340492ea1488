"""What every service shares: settings, the database models and session, the job state machine.

Importing this package reads no configuration and opens no connection; both happen on first use
(``get_settings()``, ``get_engine()``), so a module can be imported in a test or a forked worker
before the environment is final.
"""
