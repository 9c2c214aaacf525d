"""Brueghel: query preprocessing and metrics worked out by hand, and the benchmark end to end on a toy."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import eval_toy_data as toy
from benchmarks import reference_loop
from eval import brueghel
from segswap_jax.scoring import correspondence_stats
from segswap_jax import checkpoints, geometry


def test_query_resize_crop_and_cells_by_hand():
  # Box 200 x 100 in a 1000 x 800 image: ratio 3.125 -> box 64 x 32; the image would be 320 x 256, so
  # both sides are raised to 640 (ratios 1.5625, 1.25) and the box becomes [64, 160, 192, 240].
  size, box = brueghel.query_resize((1000, 800), [100, 200, 300, 300])
  assert size == (640, 640) and box == [64, 160, 192, 240]
  window, crop_box = brueghel.query_crop(size, box)
  assert window == [0, 0, 640, 640] and crop_box == [64, 160, 192, 240]
  # Cells: x 4 - 1 = 3 .. 12 + 1 = 13, y 10 - 1 = 9 .. 15 + 1 = 16 (half-open): 10 x 7 cells.
  mask = brueghel.query_cell_mask(crop_box)
  assert mask.sum() == 70 and mask[9:16, 3:13].all()
  # Python round is half to even: 56/16 - 1 = 2.5 -> 2 and 88/16 + 1 = 6.5 -> 6 (half up would give 3, 7).
  mask = brueghel.query_cell_mask([56, 40, 88, 72])
  assert mask.sum() == 16 and mask[2:6, 2:6].all()
  # An odd box side gives a 639 px crop; the window is shifted back inside the image.
  # Box 65 x 64: margins 287 and 288 -> window [413, 612, 1052, 1252], shifted by (-52, -252).
  window, crop_box = brueghel.query_crop((1000, 1000), [700, 900, 765, 964])
  assert window == [361, 360, 1000, 1000] and crop_box == [339, 540, 404, 604]


def test_average_precision_by_hand():
  # Hits at ranks 1 and 3 out of 3 ground truths: (1/1 + 2/3) / 3.
  assert brueghel.average_precision([True, False, True, False], 3) == pytest.approx((1 + 2 / 3) / 3)
  assert brueghel.average_precision([False, False], 2) == 0.0


def test_artminer_localization_ap_by_hand():
  assert brueghel.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
  gt = [['a.png', [0, 0, 10, 10]], ['c.png', [20, 20, 30, 30]], ['d.png', [0, 0, 5, 5]]]
  predictions = [('a.png', [5, 0, 15, 10]),    # IoU 1/3 > 0.3: hit, precision 1/1
                 ('b.png', [0, 0, 10, 10]),    # wrong image
                 ('a.png', [0, 0, 10, 10]),    # gt of a.png already matched
                 ('c.png', [23, 20, 33, 30]),  # IoU 70/130 = 0.54: hit, precision 2/4
                 ('d.png', [0, 0, 5, 15])]     # IoU 25/75 = 1/3 but past max_predictions=4
  assert brueghel.localization_ap(predictions, gt, 0.3, max_predictions=4) == pytest.approx((1 + 2 / 4) / 3)
  assert brueghel.localization_ap(predictions, gt, 0.3, max_predictions=5) == pytest.approx((1 + 2 / 4 + 3 / 5) / 3)
  # IoU must be strictly above the threshold.
  assert brueghel.localization_ap(predictions[:1], gt, 1 / 3) == 0.0


def test_detection_box_recovers_an_affine_map():
  """Query cells mapped by x' = 0.5 x + 0.2, y' = 0.25 y + 0.5: the box maps exactly, in original pixels."""
  h = w = 10
  centres = geometry.cell_centers(h, w)
  out_q = np.concatenate([centres * [0.5, 0.25] + [0.2, 0.5], np.full((h, w, 1), 0.9)], -1)[None]
  weight = np.random.default_rng(0).uniform(0.1, 1.0, (1, h, w)).astype(np.float32)
  cells = np.zeros((h, w), bool)
  cells[2:6, 3:8] = True
  stats = np.array(correspondence_stats(out_q.astype(np.float32), weight, cells))
  crop_box = [40, 32, 120, 96]  # in a 160 x 160 crop: [0.25, 0.2, 0.75, 0.6]
  box = brueghel.detection_boxes(stats, crop_box, (160, 160), np.array([[1000, 400]]))[0]
  expected = [(0.5 * 0.25 + 0.2) * 1000, (0.25 * 0.2 + 0.5) * 400, (0.5 * 0.75 + 0.2) * 1000, (0.25 * 0.6 + 0.5) * 400]
  np.testing.assert_allclose(box, expected, rtol=1e-4)
  # No weight at all: scale 1 around the coarse location (mean predicted position of the cells).
  stats[:, 2:] = 0.0
  box = brueghel.detection_boxes(stats, crop_box, (160, 160), np.array([[1000, 400]]))[0]
  cx, cy = stats[0, 0], stats[0, 1]
  np.testing.assert_allclose(box, [(cx - 0.25) * 1000, (cy - 0.2) * 400, (cx + 0.25) * 1000, (cy + 0.2) * 400],
                             rtol=1e-5)


# -- end to end on a toy --------------------------------------------------------------------------------
IMAGE_SIZES = [(200, 150), (180, 240), (320, 200), (160, 160), (240, 180), (200, 260), (300, 220), (170, 190)]
LABEL = {
    'b': [{'query': ['img3.png', [20, 30, 90, 100]], 'gt': [['img4.png', [40, 40, 120, 110]]]},
          {'query': ['img4.png', [40, 40, 120, 110]], 'gt': [['img3.png', [20, 30, 90, 100]]]}],
    'a': [{'query': ['img0.png', [10, 20, 60, 80]], 'gt': [['img1.png', [30, 40, 100, 120]],
                                                            ['img2.png', [100, 50, 180, 150]]]},
          {'query': ['img1.png', [30, 40, 100, 120]], 'gt': [['img0.png', [10, 20, 60, 80]],
                                                             ['img2.png', [100, 50, 180, 150]]]}],
}


@pytest.fixture(scope='module')
def brueghel_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('brueghel')
  for i, size in enumerate(IMAGE_SIZES):
    toy.save_photo(str(root / 'Image' / f'img{i}.png'), i, size)
  (root / 'Image' / 'notes.txt').write_text('a stray file')
  (root / 'brueghelTest.json').write_text(json.dumps(LABEL))
  (root / 'brueghelVal.json').write_text(json.dumps({'a': LABEL['a'][:1]}))
  return root


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  return toy.tiny_checkpoint(str(tmp_path_factory.mktemp('ckpt') / 'model'), seed=5)


def _oracle_map(root, checkpoint):
  """Retrieval mAP from the reference-style loop (unbatched, from images), with its own AP arithmetic."""
  params, config = checkpoints.load_model(checkpoint)
  loop = reference_loop.ReferenceLoopScorer(params, config)
  names = sorted(n for n in os.listdir(root / 'Image') if n.endswith('.png'))
  db = [np.asarray(Image.open(root / 'Image' / n).convert('RGB').resize((160, 160), Image.BILINEAR))
        for n in names]
  per_category, all_scores = {}, {}
  for category in sorted(LABEL):
    aps = []
    for item in LABEL[category]:
      crop, _, cells = brueghel.prepare_query(str(root / 'Image' / item['query'][0]), item['query'][1], 160, 32)
      others = [i for i, n in enumerate(names) if n != item['query'][0]]
      scores = loop.score(loop.features(crop), [db[i] for i in others], init_mask=cells, from_images=True)['score']
      all_scores[item['query'][0]] = dict(zip([names[i] for i in others], scores))
      ranked = [names[others[k]] for k in sorted(range(len(others)), key=lambda k: -scores[k])]
      gt = {g[0] for g in item['gt']}
      hits = [n in gt for n in ranked]
      aps.append(sum(sum(hits[:r + 1]) / (r + 1) for r in range(len(hits)) if hits[r]) / len(gt))
    per_category[category] = np.mean(aps)
  return per_category, all_scores


def test_brueghel_end_to_end_matches_the_reference_loop(brueghel_dir, checkpoint, tmp_path, capsys):
  out, coarse = tmp_path / 'b.json', tmp_path / 'coarse.json'
  code = brueghel.main(['--checkpoint', checkpoint, '--data-dir', str(brueghel_dir), '--split', 'test',
                        '--db-size', '160', '--query-box-size', '32', '--batch-size', '4',
                        '--cache-dtype', 'float32', '--out', str(out), '--out-coarse', str(coarse)])
  assert code == 0
  result = json.loads(out.read_text())
  expected_per_category, oracle_scores = _oracle_map(brueghel_dir, checkpoint)
  assert result['retrieval_ap_per_category'] == pytest.approx(expected_per_category, rel=1e-6)
  assert result['retrieval_map'] == pytest.approx(np.mean(list(expected_per_category.values())), rel=1e-6)
  for query in result['queries']:
    assert len(query['top']) == 7  # every database image except the query's own
    for name, score, box in query['top']:
      assert score == pytest.approx(oracle_scores[query['query'][0]][name], rel=1e-4, abs=1e-6)
      assert 0 <= box[0] <= box[2] and 0 <= box[1] <= box[3]
    assert 0.0 <= query['detection_ap'] <= 1.0
  assert [q['category'] for q in result['queries']] == ['a', 'a', 'b', 'b']  # categories sorted
  # The reference's coarse output: per query, [cx, cy, score, is_gt, db_idx] by descending score.
  coarse_result = json.loads(coarse.read_text())
  first = coarse_result['a'][0]
  assert [row[4] for row in first] != [] and all(a[2] >= b[2] for a, b in zip(first, first[1:]))
  assert {row[4] for row in first if row[3]} == {1, 2} and 0 not in {row[4] for row in first}
  assert '| mean of categories | 4 |' in capsys.readouterr().out


def test_brueghel_errors_name_the_file(brueghel_dir, checkpoint, tmp_path, capsys):
  bad = tmp_path / 'bad'
  os.makedirs(bad)
  os.symlink(brueghel_dir / 'Image', bad / 'Image')
  (bad / 'brueghelTest.json').write_text(json.dumps({'a': [{'query': ['missing.png', [0, 0, 5, 5]], 'gt': []}]}))
  args = ['--checkpoint', checkpoint, '--data-dir', str(bad), '--out', str(tmp_path / 'x.json')]
  assert brueghel.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert "brueghelTest.json: image 'missing.png' of category a is not in" in err
  (bad / 'brueghelTest.json').write_text(json.dumps({'a': [{'query': ['img0.png', [0, 0, 5]], 'gt': []}]}))
  assert brueghel.main(args) == 2
  assert 'a[0].query must be [image_name, [x1, y1, x2, y2]]' in capsys.readouterr().err
  assert brueghel.main(args + ['--split', 'val']) == 2
  assert 'annotations: file not found:' in capsys.readouterr().err
