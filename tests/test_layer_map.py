"""layer_map.py over two tiny layer scans: it reads their summaries, finds the single-layer
settings and the baselines, and draws the picture; a sweep without single-layer settings is a
one-line error."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import layer_map
import sweep
from configurator import UserError
from conftest import TINY


def knn(i):
    return [5 if j == i else 0 for j in range(4)]


def test_layer_map_of_two_scans(tmp_path):
    common = [f'--init_from={TINY}', '--seeds=3', '--max_new_tokens=4', '--plots=False',
              f"--grid={{'knn_num': {[knn(i) for i in range(4)]}}}"]
    sweep.main([*common, '--memory=\nCats are lovely.', '--start=\nCats are horrible',
                "--baselines=['plain', 'context', 'actadd']", '--actadd_layer=1', f'--out_dir={tmp_path / "s"}'])
    sweep.main([*common, '--memory=\nVancouver is a city.', '--start=\nThe city is', '--metric=recall',
                "--answers=['Vancouver']", "--baselines=['plain']", f'--out_dir={tmp_path / "r"}'])
    rows = layer_map.read_summary(str(tmp_path / 's'))
    assert sorted(layer_map.by_layer(rows)) == [0, 1, 2, 3]
    lines = layer_map.baselines(rows, 'compound_median')
    assert [m for _, _, m in lines] == ['plain', 'context', 'actadd'] and lines[2][0].startswith('best of 1 ActAdd')
    out = tmp_path / 'map.png'
    layer_map.main([f'--sentiment={tmp_path / "s"}', f'--recall={tmp_path / "r"}', f'--out={out}'])
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    sweep.main([*common[:4], '--memory=\nCats.', "--grid={'knn_num': [[0, 5, 5, 0]]}", f'--out_dir={tmp_path / "m"}'])
    with pytest.raises(UserError, match='no single-layer memory settings'):
        layer_map.main([f'--sentiment={tmp_path / "m"}'])
