"""Tokyo 24/7 and Pitts30k end to end on miniature datasets in the real on-disk formats.

The toy (see eval_toy_data): queries 0 and 1 have an exact copy in the database (db 5 in place 0, db 20
in place 1); query 2 has no database image within 25 m. Baseline top-4 orders: q0 [13, 14, 5, 15]
(first hit at rank 3), q1 [2, 20, 3, 4] (rank 2), q2 none. By hand: baseline R@1 = 0, R@5 = R@10 =
R@100 = 2/3. The constant-output model scores an exact copy highest, so re-ranking the top 4 moves
db 5 and db 20 to rank 1: R@1 = 2/3. Spatial NMS (groups of 12) keeps 13 and 5 of q0's [13, 14, 5, 15]
and changes no recall here.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import eval_toy_data as toy
from eval import pitts30k, place_formats, tokyo247

TOKYO_QRY = [f'{i:05d}.jpg' for i in range(3)]
TOKYO_DB = [f'{3814 + i // 12:05d}/{3814 + i // 12}{i % 12:02d}_{i:03d}.jpg' for i in range(24)]
PITTS_QRY = [f'000/{i:06d}_pitch1_yaw1.jpg' for i in range(3)]
PITTS_DB = [f'00{i // 12}/{i:06d}_pitch1_yaw{i % 12 + 1}.jpg' for i in range(24)]
EXPECTED_BASELINE = {'1': 0.0, '5': 2 / 3, '10': 2 / 3, '100': 2 / 3}
EXPECTED_RERANKED = {'1': 2 / 3, '5': 2 / 3, '10': 2 / 3, '100': 2 / 3}


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  return toy.constant_output_checkpoint(str(tmp_path_factory.mktemp('ckpt') / 'model'))


@pytest.fixture(scope='module')
def tokyo(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('tokyo'))
  toy.build_place_dataset(root, 'query/247query_subset_v2', 'database', TOKYO_QRY, TOKYO_DB)
  np.save(os.path.join(root, 'qry_list.npy'), np.array(TOKYO_QRY))
  np.save(os.path.join(root, 'db_list.npy'), np.array(TOKYO_DB))
  np.save(os.path.join(root, 'qry_utm.npy'), toy.PLACE_QRY_UTM)
  np.save(os.path.join(root, 'db_utm.npy'), toy.PLACE_DB_UTM)
  np.save(os.path.join(root, 'top100_patchVlad.npy'), toy.baseline_scores())
  mat_dir = os.path.join(root, 'netvlad')
  os.makedirs(mat_dir)
  toy.write_db_struct(os.path.join(mat_dir, 'tokyo247.mat'), TOKYO_DB, toy.PLACE_DB_UTM, TOKYO_QRY, toy.PLACE_QRY_UTM)
  return root


def _run(main, root, checkpoint, out, *extra):
  code = main(['--checkpoint', checkpoint, '--data-dir', root, '--topk', '4', '--batch-size', '4',
               '--image-size', '64', '96', '--cache-dtype', 'float32', '--out', str(out), *extra])
  return code, (json.loads(out.read_text()) if code == 0 and out.exists() else None)


def _assert_recall(recall, expected):
  assert recall.keys() == expected.keys()
  for n, value in expected.items():
    assert recall[n] == pytest.approx(value), n


def test_tokyo_npy_source_end_to_end(tokyo, checkpoint, tmp_path, capsys):
  code, result = _run(tokyo247.main, tokyo, checkpoint, tmp_path / 'tokyo.json')
  assert code == 0
  for name in ('baseline', 'baseline + NMS'):
    _assert_recall(result['recall'][name], EXPECTED_BASELINE)
  for name in ('re-ranked', 're-ranked + NMS'):
    _assert_recall(result['recall'][name], EXPECTED_RERANKED)
  queries = result['queries']
  assert [q['name'] for q in queries] == TOKYO_QRY
  assert [q['baseline'] for q in queries] == [list(o) for o in toy.PLACE_BASELINE_ORDER]
  assert queries[0]['reranked'][0] == 5 and sorted(queries[0]['reranked']) == [5, 13, 14, 15]
  assert queries[1]['reranked'][0] == 20
  for q in queries:  # the re-ranked order is the baseline top-4 sorted by the stored scores
    order = np.argsort(-np.array(q['scores']), kind='stable')
    assert q['reranked'] == [q['baseline'][i] for i in order]
  assert '| re-ranked + NMS | 66.7 | 66.7 | 66.7 | 66.7 |' in capsys.readouterr().out
  assert result['timing']['db_images_computed'] == 10  # distinct candidates of the three top-4 lists
  # A second run reuses the cache: nothing recomputed, same numbers.
  code, again = _run(tokyo247.main, tokyo, checkpoint, tmp_path / 'again.json')
  assert again['timing']['db_images_computed'] == 0
  assert again['queries'] == queries


def test_tokyo_mat_source_gives_the_same_result(tokyo, checkpoint, tmp_path):
  mat = os.path.join(tokyo, 'netvlad', 'tokyo247.mat')
  code, result = _run(tokyo247.main, tokyo, checkpoint, tmp_path / 'mat.json', '--source', 'mat', '--mat', mat)
  assert code == 0 and result['sources']['db_list'].endswith('tokyo247.mat:db_list')
  _assert_recall(result['recall']['re-ranked + NMS'], EXPECTED_RERANKED)
  _assert_recall(result['recall']['baseline'], EXPECTED_BASELINE)
  loaded = place_formats.read_db_struct(mat)
  assert loaded['db_list'] == TOKYO_DB and loaded['pos_dist_thr'] == 25.0
  np.testing.assert_array_equal(loaded['qry_utm'], toy.PLACE_QRY_UTM)


def test_pitts_with_index_matrix_baseline(tmp_path, checkpoint):
  root = str(tmp_path / 'pitts')
  toy.build_place_dataset(root, 'queries_real', '.', PITTS_QRY, PITTS_DB)
  toy.write_db_struct(os.path.join(root, 'pitts30k_test.mat'), PITTS_DB, toy.PLACE_DB_UTM, PITTS_QRY,
                      toy.PLACE_QRY_UTM)
  # Patch-NetVLAD-style predictions: (queries, K) int database indices, best first.
  np.save(os.path.join(root, 'top100_patchVlad.npy'), np.array(toy.PLACE_BASELINE_ORDER, np.int64))
  code, result = _run(pitts30k.main, root, checkpoint, tmp_path / 'pitts.json')
  assert code == 0
  assert set(result['recall']) == {'baseline', 're-ranked'}  # no NMS for Pitts30k
  # Only 4 entries per row exist, so R@5..100 are over those 4: same hand values as above.
  _assert_recall(result['recall']['baseline'], EXPECTED_BASELINE)
  _assert_recall(result['recall']['re-ranked'], EXPECTED_RERANKED)


def _error(capsys):
  """The last stderr line (progress bars come before it)."""
  return capsys.readouterr().err.strip().split('\n')[-1].split('\r')[-1]


def test_clear_errors_name_the_file(tokyo, checkpoint, tmp_path, capsys):
  bad = tmp_path / 'bad'
  os.makedirs(bad / 'database')
  for name in ('qry_list.npy', 'qry_utm.npy', 'db_utm.npy'):
    shutil.copy(os.path.join(tokyo, name), bad / name)
  # Missing db_list.npy and no .mat to fall back on.
  code, _ = _run(tokyo247.main, str(bad), checkpoint, tmp_path / 'x.json')
  err = _error(capsys)
  assert code == 2 and err.startswith('error: file not found:') and 'db_list.npy' in err
  # List / matrix size mismatch.
  np.save(bad / 'db_list.npy', np.array(TOKYO_DB))
  np.save(bad / 'top100_patchVlad.npy', toy.baseline_scores()[:2])
  code, _ = _run(tokyo247.main, str(bad), checkpoint, tmp_path / 'x.json')
  err = _error(capsys)
  assert code == 2 and 'top100_patchVlad.npy has 2 rows but' in err and 'qry_list.npy lists 3 queries' in err
  np.save(bad / 'top100_patchVlad.npy', toy.baseline_scores()[:, :20])
  code, _ = _run(tokyo247.main, str(bad), checkpoint, tmp_path / 'x.json')
  assert code == 2 and 'score matrix has 20 columns but the database list has 24' in _error(capsys)
  np.save(bad / 'db_utm.npy', toy.PLACE_DB_UTM[:23])
  code, _ = _run(tokyo247.main, str(bad), checkpoint, tmp_path / 'x.json')
  assert code == 2 and 'db_list.npy has 24 names but' in _error(capsys)
  # .mat names in another order than db_utm.npy.
  os.remove(bad / 'db_list.npy')
  np.save(bad / 'db_utm.npy', toy.PLACE_DB_UTM[::-1])
  code, _ = _run(tokyo247.main, str(bad), checkpoint, tmp_path / 'x.json',
                 '--mat', os.path.join(tokyo, 'netvlad', 'tokyo247.mat'))
  assert code == 2 and 'db_utm.npy disagrees with' in _error(capsys)


def test_unreadable_image_names_the_file(tokyo, checkpoint, tmp_path, capsys):
  root = tmp_path / 'broken'
  os.makedirs(root)
  for name in ('qry_list.npy', 'qry_utm.npy', 'db_utm.npy', 'db_list.npy', 'top100_patchVlad.npy'):
    shutil.copy(os.path.join(tokyo, name), root / name)
  os.symlink(os.path.join(tokyo, 'query'), root / 'query')
  os.makedirs(root / 'database')
  for name in TOKYO_DB:
    path = root / 'database' / name.replace('.jpg', '.png')
    os.makedirs(path.parent, exist_ok=True)
    path.write_bytes(b'\x89PNG truncated')
  code, _ = _run(tokyo247.main, str(root), checkpoint, tmp_path / 'x.json')
  err = _error(capsys)
  assert code == 2 and err.startswith('error: ') and 'unreadable or corrupt image' in err and '/broken/database/0381' in err


def test_two_processes_split_queries_and_process_0_writes(tokyo, checkpoint, tmp_path):
  """The same command on two JAX processes (2 emulated devices each): same numbers as one process."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  out = tmp_path / 'multi.json'
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'eval.tokyo247', '--checkpoint', checkpoint, '--data-dir', tokyo, '--topk', '4',
       '--batch-size', '4', '--image-size', '64', '96', '--cache-dtype', 'float32', '--out', str(out),
       '--coordinator-address', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(i)],
      env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert 'wrote' in logs[0] and 'wrote' not in logs[1]
  result = json.loads(out.read_text())
  assert result['timing']['processes'] == 2 and result['timing']['devices_per_process'] == 2
  _assert_recall(result['recall']['baseline + NMS'], EXPECTED_BASELINE)
  _assert_recall(result['recall']['re-ranked + NMS'], EXPECTED_RERANKED)
  assert [q['reranked'][0] for q in result['queries'][:2]] == [5, 20]
