"""
Running a script's shards as jobs through submitit: a SLURM job array on a cluster, or
subprocesses on this machine with submitit's local executor (the same path, for testing).

Each shard is the script's own command line plus --shard=i/n, run as a command in the job
(submitit.helpers.CommandFunction), so a job needs nothing pickled from here and resumes the
way the script does when it is run again. launch_shards submits them, records the job ids and
log paths, and (wait=True) waits, submitting a failed or preempted shard again up to `retries`
times. The keys are torch-free so that a script's --help can list them at once.
"""

import json
import os
import shutil
import sys

from configurator import UserError
from files import write_whole

LAUNCH_DEFAULTS = dict(
    launcher='',           # '' = run here, in this process; 'local' (submitit's local executor) or 'slurm': run shards as jobs
    shards=0,              # with a launcher: how many shards (jobs) to split the work into
    wait=True,             # with a launcher: wait for the jobs, then merge; False = return once submitted
    retries=2,             # with a launcher: times a failed or preempted shard is submitted again (it resumes)
    slurm_partition='',    # SLURM: the partition ('' = the cluster's default)
    slurm_time=240,        # SLURM: the time limit per shard, minutes
    slurm_gpus=0,          # SLURM: GPUs per shard
    slurm_cpus=2,          # SLURM: CPUs per shard
    slurm_mem_gb=16,       # SLURM: memory per shard, GB
    slurm_parallelism=0,   # SLURM: how many array tasks run at once; 0 = no limit
    slurm_extra={},        # SLURM: further sbatch options, e.g. {'account': 'mylab', 'qos': 'high'}
)
LAUNCHERS = ('', 'local', 'slurm')


def shard_argv(argv: list[str], drop=()) -> list[str]:
    """A shard job's command line: the user's, without the launcher's keys (and `drop`), run
    in this process (--launcher= --shards=0), so the job does not launch again."""
    keys = set(LAUNCH_DEFAULTS) | set(drop)
    return [a for a in argv if a.split('=', 1)[0].lstrip('-') not in keys] + ['--launcher=', '--shards=0']


def check_launch(config: dict) -> None:
    """Every launcher key, checked before anything is submitted."""
    launcher, shards = config['launcher'], config['shards']
    if launcher not in LAUNCHERS:
        raise UserError(f"launcher={launcher!r} must be '' (this process), 'local' or 'slurm'")
    if not launcher:
        if shards:
            raise UserError(f"shards={shards} needs a launcher: --launcher=local or --launcher=slurm")
        return
    if not isinstance(shards, int) or not 1 <= shards <= 10_000:
        raise UserError(f"launcher={launcher!r} needs shards=n, 1 <= n <= 10000 (got {shards!r}), e.g. --shards=4")
    for key in ('slurm_time', 'slurm_cpus', 'slurm_mem_gb'):
        if config[key] < 1:
            raise UserError(f"{key}={config[key]} must be at least 1")
    for key in ('slurm_gpus', 'slurm_parallelism', 'retries'):
        if config[key] < 0:
            raise UserError(f"{key}={config[key]} must be 0 or more")
    if not all(isinstance(k, str) and k.replace('_', '-').replace('-', '').isalnum() for k in config['slurm_extra']):
        raise UserError(f"slurm_extra={config['slurm_extra']!r}: keys must be sbatch option names, e.g. {{'account': 'mylab'}}")
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("launcher needs submitit: pip install submitit") from None
    if launcher == 'slurm' and not (shutil.which('sbatch') and shutil.which('srun')):
        raise UserError("launcher='slurm' but this machine has no SLURM (sbatch and srun are not on PATH); run it on "
                        "the cluster's login node, or use --launcher=local to run the shards here")


def executor(config: dict, folder: str, name: str):
    """A submitit executor for config's launcher, writing its logs under folder; jobs named name."""
    import submitit
    ex = submitit.AutoExecutor(folder=folder, cluster='local' if config['launcher'] == 'local' else 'slurm')
    params = dict(timeout_min=config['slurm_time'], cpus_per_task=config['slurm_cpus'], mem_gb=config['slurm_mem_gb'],
                  gpus_per_node=config['slurm_gpus'], name=name)
    if config['launcher'] == 'slurm':
        params.update(slurm_additional_parameters=dict(config['slurm_extra']))
        if config['slurm_partition']:
            params.update(slurm_partition=config['slurm_partition'])
        if config['slurm_parallelism']:
            params.update(slurm_array_parallelism=config['slurm_parallelism'])
    ex.update_parameters(**params)
    return ex


def record(jobs_file: str, jobs: dict) -> None:
    """jobs.json: per shard, its job ids (one per attempt) and log paths."""
    write_whole(jobs_file, json.dumps({f"{i}/{len(jobs)}": [dict(job_id=str(j.job_id), stdout=str(j.paths.stdout),
                                                                 stderr=str(j.paths.stderr)) for j in attempts]
                                       for i, attempts in sorted(jobs.items())}, indent=1))


def launch_shards(config: dict, script: str, argv: list[str], folder: str) -> list[int]:
    """Run `python script *argv --shard=i/n` for i < n as jobs (logs and jobs.json in folder).
    wait=False: return once submitted. wait=True: wait for every shard, submitting one that
    failed again up to `retries` times; return the shards that still failed (their logs are
    named on stderr)."""
    from submitit.helpers import CommandFunction
    n = config['shards']
    os.makedirs(folder, exist_ok=True)
    name = os.path.splitext(os.path.basename(script))[0] + '-' + os.path.basename(os.path.dirname(os.path.abspath(folder)))
    ex = executor(config, os.path.join(folder, '%j'), name)
    command = CommandFunction([sys.executable, os.path.abspath(script), *argv], verbose=True, cwd=os.getcwd())  # the log holds its output
    shard_args = [f"--shard={i}/{n}" for i in range(n)]
    jobs_file = os.path.join(folder, 'jobs.json')
    with ex.batch():
        submitted = [ex.submit(command, a) for a in shard_args]
    jobs = {i: [j] for i, j in enumerate(submitted)}
    record(jobs_file, jobs)
    print(f"submitted {n} shards ({config['launcher']}): jobs {', '.join(str(j.job_id) for j in submitted)}; "
          f"logs and job ids in {folder}", file=sys.stderr)
    if not config['wait']:
        return []
    failed = []
    for i in range(n):
        while True:
            job = jobs[i][-1]
            try:
                job.result()
                break
            except Exception as e:  # a failed, killed or preempted shard: its finished work is kept
                if len(jobs[i]) > config['retries']:
                    last = str(e).strip().splitlines()
                    print(f"shard {i}/{n} failed {len(jobs[i])} times; last error: {last[-1] if last else type(e).__name__}; "
                          f"log: {job.paths.stderr}", file=sys.stderr)
                    failed.append(i)
                    break
                print(f"shard {i}/{n} (job {job.job_id}) failed; submitting it again, it resumes", file=sys.stderr)
                jobs[i].append(ex.submit(command, shard_args[i]))
                record(jobs_file, jobs)
    return failed
