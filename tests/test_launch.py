"""Shards as jobs through submitit (launch.py), run with its local executor: a sharded sweep
gives exactly the single-process sweep's files, a killed shard is submitted again and resumes,
a sharded build gives exactly the single build's memory, SLURM submission writes the settings
asked for (with stand-in sbatch/srun), and bad launcher settings are one-line errors before
anything is submitted."""
import json
import os
import threading
import time

import pytest

from conftest import TINY_ARG, one_line_error, run_script, write_docs

SWEEP = f"""init_from = {os.path.join(os.path.dirname(os.path.abspath(__file__)), 'reference', 'tiny-gpt2')!r}
memory = "\\nCats are lovely, kind and gentle companions."
start = "\\nCats are horrible"
knn_num = [0, 3, 3, 0]
bookkeeping_frac = 0.1
knn_softmax_influence = 0.01
resid_frac = 0.33
seeds = 3
max_new_tokens = 6
baselines = ['plain']
grid = {{'mem_frac': [1.0, 5.0]}}
plots = False
"""
OUTPUTS = ('results.csv', 'samples.jsonl', 'summary.csv', 'summary.txt')


def sweep_config(tmp_path, text=SWEEP):
    cfg = tmp_path / 'sweep_launch.py'
    cfg.write_text(text, encoding='utf-8')
    return str(cfg)


def read(folder, files=OUTPUTS):
    return {f: (folder / f).read_text(encoding='utf-8') for f in files}


def test_a_sweep_in_three_local_jobs_equals_one_process(tmp_path):
    cfg = sweep_config(tmp_path)
    assert run_script('sweep.py', cfg, f'--out_dir={tmp_path / "one"}').returncode == 0
    r = run_script('sweep.py', cfg, f'--out_dir={tmp_path / "jobs"}', '--launcher=local', '--shards=3')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'submitted 3 shards (local)' in r.stderr and 'merged 3 of 3 settings from 3 shard folder(s)' in r.stdout
    assert read(tmp_path / 'jobs') == read(tmp_path / 'one')
    jobs = json.loads((tmp_path / 'jobs' / 'jobs' / 'jobs.json').read_text())
    assert sorted(jobs) == ['0/3', '1/3', '2/3'] and all(os.path.isfile(a[0]['stdout']) for a in jobs.values())
    # run again: every shard finds its settings finished, and the merge gives the same files
    r = run_script('sweep.py', cfg, f'--out_dir={tmp_path / "jobs"}', '--launcher=local', '--shards=3')
    assert r.returncode == 0 and read(tmp_path / 'jobs') == read(tmp_path / 'one')


def shard_pids(marker):
    """Processes whose command line holds marker (the shard's own sweep.py, not its submitit wrapper)."""
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            cmd = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\0')
        except OSError:
            continue
        if any(a.endswith(b'sweep.py') for a in cmd) and marker.encode() in cmd:
            found.append(int(pid))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the shard process through /proc')
def test_a_killed_shard_is_submitted_again_and_resumes(tmp_path):
    """Shard 1 is killed after it finished a setting; the launcher submits it again, the new job
    runs only the unfinished settings, and the merged results equal one process's."""
    cfg = sweep_config(tmp_path, SWEEP.replace("'mem_frac': [1.0, 5.0]", "'mem_frac': [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]")
                       .replace('max_new_tokens = 6', 'max_new_tokens = 24'))
    assert run_script('sweep.py', cfg, f'--out_dir={tmp_path / "one"}').returncode == 0
    out = tmp_path / 'jobs'
    killed = []

    def kill_shard_1():
        settings = out / 'shards' / '1-of-3' / 'settings'
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if settings.is_dir() and any(settings.glob('*.json')):
                for pid in shard_pids('--shard=1/3'):
                    os.kill(pid, 9)
                    killed.append(len(list(settings.glob('*.json'))))
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_shard_1)
    watcher.start()
    r = run_script('sweep.py', cfg, f'--out_dir={out}', '--launcher=local', '--shards=3', '--retries=1')
    watcher.join()
    assert killed and killed[0] < 3, killed  # killed mid-run, with finished settings left behind
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'shard 1/3' in r.stderr and 'submitting it again' in r.stderr
    assert read(out) == read(tmp_path / 'one')
    attempts = json.loads((out / 'jobs' / 'jobs.json').read_text())['1/3']
    assert len(attempts) == 2
    second = open(attempts[1]['stderr'], encoding='utf-8').read()
    assert f"{killed[0]} already finished" in second


def test_a_sharded_build_equals_one_build(tmp_path):
    docs = write_docs(tmp_path / 'docs', [30, 55, 12, 80, 41])
    one, parts = tmp_path / 'one', tmp_path / 'sharded'
    assert run_script('build_memory.py', str(docs), TINY_ARG, f'--mem_store={one}', '--layers=[1,2]').returncode == 0
    r = run_script('build_memory.py', str(docs), TINY_ARG, f'--mem_store={parts}', '--layers=[1,2]',
                   '--launcher=local', '--shards=3')
    assert r.returncode == 0, r.stderr[-2000:]
    assert '(3 parts merged)' in r.stdout
    manifest = lambda d: json.loads((d / 'memory.json').read_text())
    assert manifest(parts) == manifest(one)  # documents, windows and the tensors' checksum
    assert not (tmp_path / 'sharded.parts').exists()  # the parts are removed once merged


def test_bad_launcher_settings_are_one_line_errors_before_anything_is_submitted(tmp_path, monkeypatch):
    cfg = sweep_config(tmp_path)
    out = tmp_path / 'out'
    cases = [(['--launcher=pbs', '--shards=2'], "launcher='pbs' must be"),
             (['--launcher=local'], 'needs shards=n'),
             (['--shards=2'], 'shards=2 needs a launcher'),
             (['--launcher=local', '--shards=2', '--slurm_time=0'], 'slurm_time=0 must be at least 1'),
             (['--launcher=local', '--shards=2', '--retries=-1'], 'retries=-1 must be 0 or more'),
             (['--launcher=local', '--shards=2', '--shard=0/2'], 'without shard, merge or replot')]
    for args, message in cases:
        one_line_error(run_script('sweep.py', cfg, f'--out_dir={out}', *args), message)
    monkeypatch.setenv('PATH', str(tmp_path))  # no sbatch here
    one_line_error(run_script('sweep.py', cfg, f'--out_dir={out}', '--launcher=slurm', '--shards=2'),
                   'this machine has no SLURM')
    assert not out.exists()
    docs = write_docs(tmp_path / 'docs', [10, 10])
    one_line_error(run_script('build_memory.py', str(docs), TINY_ARG, f'--mem_store={tmp_path / "m"}',
                              '--launcher=local', '--shards=3'), '3 shards of 2 documents')
    one_line_error(run_script('build_memory.py', str(docs), TINY_ARG, f'--mem_store={tmp_path / "m"}',
                              '--launcher=local', '--shards=2', '--append=True'), 'does not combine with append')
    assert not (tmp_path / 'm').exists() and not (tmp_path / 'm.parts').exists()


def test_slurm_submission_writes_the_settings_asked_for(tmp_path, monkeypatch):
    """With stand-in sbatch and srun on PATH: one job array, with the partition, time, CPUs,
    memory, parallelism and extra options given; wait=False returns with the merge command."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'sbatch').write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\necho "Submitted batch job 4242"\n')
    (bin_dir / 'srun').write_text('#!/bin/sh\nexit 0\n')
    for f in ('sbatch', 'srun'):
        os.chmod(bin_dir / f, 0o755)
    monkeypatch.setenv('PATH', f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / 'out'
    r = run_script('sweep.py', sweep_config(tmp_path), f'--out_dir={out}', '--launcher=slurm', '--shards=2',
                   '--wait=False', '--slurm_partition=gpu', '--slurm_time=30', '--slurm_cpus=4', '--slurm_mem_gb=8',
                   '--slurm_parallelism=1', "--slurm_extra={'account': 'lab'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'jobs 4242_0, 4242_1' in r.stderr and '--merge=True' in r.stdout
    script = next((out / 'jobs').glob('.submission_file_*.sh')).read_text()
    for line in ('--array=0-1%1', '--partition=gpu', '--time=30', '--cpus-per-task=4', '--mem=8GB', '--account=lab',
                 '--job-name=sweep-out'):
        assert f"#SBATCH {line}\n" in script, (line, script)
    assert len((bin_dir / 'calls').read_text().splitlines()) == 1  # one array, one sbatch call
    assert sorted(json.loads((out / 'jobs' / 'jobs.json').read_text())) == ['0/2', '1/2']
