"""The trainer: runs stage-1 (BYOL, ``pretrain``) and stage-3 (ORL, ``train``) jobs.

Modules:
  __main__.py   ``python -m services.trainer``: the process (claim -> train -> report, forever)
  runner.py     the loop, the job's heartbeat (``services.common.heartbeat``), artifacts, torchrun
  spec.py       a job row -> config, images or pairs (read from the database), output folder
  ddp_entry.py  one rank of a data-parallel run (``torchrun ... -m services.trainer.ddp_entry``)

Trainers on other hosts
-----------------------
A trainer needs ``ORL_DATABASE_URL`` (the shared Postgres: jobs are claimed from it with
``FOR UPDATE SKIP LOCKED``, so any number of trainers on any hosts can poll it and each job goes
to one of them), ``ORL_ARTIFACTS_DIR`` (a volume every host mounts, e.g. NFS: checkpoints are
written to ``jobs/<job id>/last.pt`` under it, which is how a job resumes on another host after
its trainer died) and ``ORL_BROKER_URL`` (only to start the mine stage of a pipeline). The
dataset folders must be readable at the same absolute path on every host. Start one per host::

    ORL_DATABASE_URL=postgresql+psycopg://orl@db/orl ORL_BROKER_URL=redis://broker:6379/0 \
    ORL_ARTIFACTS_DIR=/mnt/orl/artifacts python -m services.trainer

Several GPUs on one host: a job with ``params.nproc = N`` (default: every visible GPU when there
are several) runs under ``torchrun --standalone --nproc_per_node N`` (DDP, SyncBatchNorm, NCCL).
One data-parallel job spanning several hosts is not launched by the service.
"""
