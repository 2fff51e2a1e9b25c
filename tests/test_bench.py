"""bench_memory.py on small sizes: its parts run, its rows are what they claim, its verdict line is there."""
import pytest

from build import build_documents, read_documents
from conftest import run_script, write_docs
from store import load_memory

pytestmark = pytest.mark.slow  # each runs the memory benchmark (small); CI runs them: pytest -m slow


def test_bench_memory_runs_and_judges_its_target():
    # the benchmark's every part on small sizes: the model pass, the search-alone figures, the
    # decoding measurements and the verdict line (its timings are not asserted: noisy)
    r = run_script('bench_memory.py', '--sizes=[400,800]', "--indexes=['flat','ivf']", '--queries=64',
                   '--prompt_len=8', '--new_tokens=2', '--repeat=1', '--build_tokens=1024', '--build_docs=20', '--build_doc_tokens=16',
                   '--attention_sizes=[400]', '--layer_call_sizes=[300]')
    assert r.returncode == 0, r.stderr
    lines, attention = r.stdout.split('\none search call')[0].splitlines(), r.stdout.split('\nretrieval attention')[1]
    # one search call per layer against one per head: both searches find the same rows
    calls = [l.split() for l in r.stdout.split('\none search call per layer')[1].split('\nretrieval attention')[0].splitlines()]
    assert [row[:2] + row[-1:] for row in calls if row and row[0] == '300'] == [['300', '2', 'True'], ['300', '30', 'True']]
    # retrieval attention beside value mixing: a row of three added times for the size asked for
    row = next(l.split() for l in attention.splitlines() if l.split() and l.split()[0] == '400')
    assert len(row) == 4 and all(v != 'nan' for v in row[1:])
    assert any(l.startswith('building: the model pass') and 'tokens/s' in l for l in lines)
    # the build's model pass over a long text and over small documents, each with default threads and one
    for case in ('long text: ', '20 small documents: '):
        line = next(l for l in lines if l.strip().startswith(case))
        assert '(1 thread,' in line and "x the best's time)" in line
    table = lines[next(i for i, l in enumerate(lines) if l.split()[:2] == ['tokens', 'index']) + 1:]
    rows = {(int(l.split()[0]), l.split()[1]): l.split() for l in table if l.split() and l.split()[0].isdigit()}
    assert set(rows) == {(400, 'flat'), (400, 'ivf'), (800, 'flat'), (800, 'ivf')}
    # a row: tokens, index, build s, rows/s, load s, searched with, recall@k, us/query, search ms/tok
    # cached and exact, +ms/tok cached and exact, own ms/tok cached and exact, lookups, index MB,
    # disk MB, peak GB
    assert rows[(400, 'flat')][6] == rows[(800, 'flat')][6] == '1.000'  # exact search is exact
    assert rows[(400, 'ivf')][4] != 'nan' and rows[(400, 'flat')][4] == 'nan'  # an approximate index's reload
    assert rows[(400, 'ivf')][5].startswith('nprobe=') and rows[(400, 'flat')][5] == '-'  # calibrated
    assert all(row[10] != 'nan' and row[11] != 'nan' for row in rows.values())  # decoding measured for each
    assert all(float(row[12]) > 0 and float(row[13]) > 0 for row in rows.values())  # the memory's own time too
    verdict = next(l for l in lines if l.strip().startswith('ivf at 800:'))
    assert 'cached' in verdict and 'exact' in verdict and 'recall@5' in verdict and "the memory's own time" in verdict


def test_bench_memory_on_a_built_memorys_keys(tmp_path, tiny):
    # keys_from: the rows of a built memory, not random ones; the queries are held-out rows,
    # and a size the memory cannot fill is skipped, not measured on fewer keys
    model, enc = tiny
    path = build_documents(model, enc, read_documents(str(write_docs(tmp_path / 'docs', [900]))),
                           str(tmp_path / 'mem'), layers=[2], progress=False)
    rows, head_size = load_memory(path).num_entries(), model.config.head_dim
    r = run_script('bench_memory.py', f'--keys_from={path}', '--keys_head=1', '--sizes=[300,5000]',
                   "--indexes=['flat','hnsw']", '--queries=32', '--decode=False', '--build_tokens=0',
                   '--build_docs=0', f'--head_size={head_size + 1}')  # the keys' size wins over head_size
    assert r.returncode == 0, r.stderr
    assert f"keys: {rows} stored keys of {path}, layer 2, head 1; queries: 32" in r.stdout
    measured = [l.split() for l in r.stdout.splitlines() if l.split() and l.split()[0].isdigit()]
    assert [(row[0], row[1]) for row in measured[:2]] == [('300', 'flat'), ('300', 'hnsw')]
    assert measured[0][6] == '1.000' and measured[2][:2] == ['5000', 'skipped:']
    bad = run_script('bench_memory.py', f'--keys_from={path}', '--keys_head=99', '--decode=False')
    assert bad.returncode != 0 and 'keys_head=99' in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
