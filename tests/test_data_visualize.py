"""Contact sheet of stored pairs."""
import os

import cv2
import numpy as np
import pytest

from data_pipeline import builder
from data_pipeline import visualize
from test_data_support import small_dataset  # noqa: F401 (fixture)


def test_contact_sheet_layout_and_overlays(small_dataset, tmp_path):
  sheet = visualize.contact_sheet(small_dataset, n=5, tile=96, columns=4)
  assert sheet.shape == (2 * (2 * 96 + 6) - 6, 4 * (2 * 96 + 6) - 6, 3)
  assert (sheet[2 * 96:2 * 96 + 6] == 255).all()  # the gap between block rows
  example = builder.data_source(small_dataset, 'train')[0]
  plain = cv2.resize(builder.decode_jpeg(example['image_b_styled']), (96, 96),
                     interpolation=cv2.INTER_AREA)
  np.testing.assert_array_equal(sheet[96 + 20:2 * 96, 96:2 * 96], plain[20:])  # styled B, untouched
  # The top row carries the tinted masks: it differs from the plain images where masks are on.
  top_b = sheet[20:96, 96:2 * 96].astype(int)
  image_b = cv2.resize(builder.decode_jpeg(example['image_b']), (96, 96),
                       interpolation=cv2.INTER_AREA)[20:].astype(int)
  assert np.abs(top_b - image_b).mean() > 1.0
  out = tmp_path / 'pairs.png'
  data_dir = os.path.dirname(os.path.dirname(os.path.dirname(small_dataset)))  # as given to generate
  visualize.main(['--data-dir', data_dir, '--n', '3', '--out', str(out)])
  assert cv2.imread(str(out)).shape[0] > 0


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
  assert visualize.main(['--data-dir', str(tmp_path), '--out', str(tmp_path / 'x.png')]) == 2
  assert capsys.readouterr().err.startswith(f'error: no segswap_pairs dataset under {tmp_path}')
