"""The miner: stage 2 of ORL (correspondence discovery) as Celery tasks on queues cpu and gpu.

Modules:
  celery_app.py  the worker app (``celery -A services.miner.celery_app worker ...``)
  tasks.py       thin tasks: job / image ids in, database rows out
  pipeline.py    what each task does, as calls into ``orl.proposals`` and ``orl.mining``
  records.py     the SQL the pipeline needs (idempotent writes through the unique keys)
  params.py      mining parameters of a job -> ``orl.config.MineConfig`` + cache keys
  roi_cache.py   RoI features per (checkpoint, proposals, roi mode, image) as .npy files
  keepalive.py   which mining jobs have tasks waiting in the broker queues (their heartbeat is
                 renewed by ``services.common.jobs.keep_alive``)

The job row is written only through ``services.common.jobs``; the plan a job runs with is a
``services.common.plan.MinePlan``; correspondence.json comes from
``services.common.correspondences.mine_job_correspondence`` (what the API exports, too).

Workers on other hosts
----------------------
A miner worker needs exactly three shared things, all named by environment variables:
``ORL_BROKER_URL`` (the one Redis every worker and the API use), ``ORL_DATABASE_URL`` (the one
Postgres), and ``ORL_ARTIFACTS_DIR`` (checkpoints, RoI caches and exports: a shared volume such
as NFS, mounted on every host; artifact rows store paths relative to it, so the mount point may
differ per host). The dataset folders must be readable at the same absolute path on every host
(``datasets.path``), e.g. the same NFS export mounted at the same place. Then, on any host::

    ORL_BROKER_URL=redis://broker:6379/0 ORL_DATABASE_URL=postgresql+psycopg://orl@db/orl \
    ORL_ARTIFACTS_DIR=/mnt/orl/artifacts \
    ORL_CPU_CONCURRENCY=4 ORL_SS_PROCESSES=4 celery -A services.miner.celery_app worker -Q cpu -n cpu@%h

(a 16-core host: four shards at once, four selective-search processes each; the counts must fit
the cores, ``services/miner/threads.py``), or ``-Q gpu --pool solo -n gpu@%h``, one worker per GPU
with ``CUDA_VISIBLE_DEVICES``, for GPU hosts. Nothing else is coordinated between hosts: work is
split into shards that any worker may take, completion is counted in the database, and every
task is idempotent, so a host that dies loses only the shard it held (the broker redelivers it
after ``ORL_VISIBILITY_TIMEOUT_S``, and the stale-job reaper re-sends the job after
``ORL_LEASE_S`` without heartbeats).
"""
