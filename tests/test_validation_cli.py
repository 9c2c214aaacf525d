"""`python -m segswap_jax.validation`: a saved model's held-out metrics, checked against the inference
API on the stored images, and its one-line errors."""
import json
import os

import cv2
import jax
import numpy as np

from data_pipeline import builder
from segswap_jax import checkpoints
from segswap_jax import inference
from segswap_jax import losses
from segswap_jax import model as model_lib
from segswap_jax import validation
from test_data_support import small_dataset  # noqa: F401 (fixture)


def small_model(directory):
  config = model_lib.model_config('tiny', 'I C')
  config.backbone = 'small_convnet'
  config.backbone_widths = (8, 8, 16, 16)
  config.feature_dim = 16
  checkpoints.save_model(directory, model_lib.init_params(config, jax.random.PRNGKey(4)), config)
  return directory


def test_metrics_match_the_inference_api_on_the_stored_pairs(small_dataset, tmp_path):  # noqa: F811
  checkpoint = small_model(str(tmp_path / 'model'))
  out, picture = tmp_path / 'metrics.json', tmp_path / 'preds.png'
  assert validation.main(['--checkpoint', checkpoint, '--data-dir', small_dataset, '--out', str(out),
                          '--picture', str(picture)]) == 0
  result = json.loads(out.read_text())

  # The same numbers from the public inference API on the decoded validation images.
  model = inference.SegSwap.load(checkpoint)
  source = builder.data_source(small_dataset, 'validation')
  ious, errors = [], []
  for i in range(len(source)):
    example = source[i]
    images = np.stack([builder.decode_jpeg(example['image_a']), builder.decode_jpeg(example['image_b'])])
    features = model.features(images)
    outputs = model.pair(features[:1], features[1:])
    for out_map, side in ((outputs[0], 'a'), (outputs[1], 'b')):
      out_map, mask = np.asarray(out_map)[0], example[f'mask_{side}']
      ious.append(float(losses.mask_iou(out_map[..., 2], mask)))
      error = np.asarray(losses.correspondence_error_cells(out_map[..., :2], example[f'corr_{side}']))
      errors.append(error[mask > 0.5])
  assert result['num_pairs'] == len(source) == 2
  np.testing.assert_allclose(result['mask_iou'], np.mean(ious), atol=1e-6)
  np.testing.assert_allclose(result['corr_error_median'], np.median(np.concatenate(errors)), rtol=1e-4)
  drawn = cv2.imread(str(picture))
  assert drawn is not None and drawn.shape[0] > 2 * 256   # two pairs, enlarged


def test_errors_are_one_line(small_dataset, tmp_path, capsys):  # noqa: F811
  assert validation.main(['--checkpoint', str(tmp_path / 'nowhere'), '--data-dir', small_dataset]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error:') and 'nowhere' in err and '\n' not in err
  checkpoint = small_model(str(tmp_path / 'model'))
  assert validation.main(['--checkpoint', checkpoint, '--data-dir', str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error:') and 'no segswap_pairs dataset' in err and '\n' not in err
  assert validation.main(['--checkpoint', checkpoint, '--data-dir', small_dataset, '--split', 'test']) == 2
  assert "no split 'test'" in capsys.readouterr().err
