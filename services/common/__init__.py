"""What every service shares.

  settings.py         ORL_* configuration (a leaf: imports no other service module)
  runtime.py          engine, session factory and sending Celery app, built from Settings; reset()
  db.py               sessions, idempotent bulk writes (INSERT ... ON CONFLICT DO NOTHING), chunks
  broker.py           dispatch of a job to whoever runs it (task names: MINE_TASK)
  models.py           SQLAlchemy models, JobStatus
  jobs.py             the job state machine: the only writer of job rows
  heartbeat.py        the thread that renews a job's lease while a worker runs it
  plan.py             MinePlan: the values a mining job runs with, recorded in its row
  artifacts.py        artifact rows and their files
  correspondences.py  a mine job's rows -> Correspondence (the miner's file = the API's export)
  reviews.py          people's verdicts on mined pairs; a mining job's reviewed precision
  datasets.py         data roots, path checks, scanning a folder
  migrate.py          ``python -m services.common.migrate``

Importing this package reads no configuration and opens no connection; both happen on first use
(``get_settings()``, ``runtime.get_engine()``), so a module can be imported in a test or a forked
worker before the environment is final.
"""
