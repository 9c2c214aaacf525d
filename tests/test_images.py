"""The one image reader: every format and depth PIL decodes becomes the RGB the reference would feed."""
import os

import cv2
import numpy as np
import PIL.Image
import pytest

from data_pipeline import segments
from segswap_jax import errors
from segswap_jax import images


@pytest.fixture(scope='module')
def rgb8():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def test_a_16_bit_png_reads_as_its_8_bit_version(rgb8, tmp_path):
  cv2.imwrite(str(tmp_path / 'c8.png'), cv2.cvtColor(rgb8, cv2.COLOR_RGB2BGR))
  cv2.imwrite(str(tmp_path / 'c16.png'), cv2.cvtColor(rgb8.astype(np.uint16) * 257, cv2.COLOR_RGB2BGR))
  grey = rgb8[..., 0]
  cv2.imwrite(str(tmp_path / 'g8.png'), grey)
  cv2.imwrite(str(tmp_path / 'g16.png'), grey.astype(np.uint16) * 257)
  assert PIL.Image.open(tmp_path / 'g16.png').mode.startswith('I')   # the case PIL alone turns white
  np.testing.assert_array_equal(images.read_rgb(str(tmp_path / 'c16.png')), images.read_rgb(str(tmp_path / 'c8.png')))
  np.testing.assert_array_equal(images.read_rgb(str(tmp_path / 'g16.png')), images.read_rgb(str(tmp_path / 'g8.png')))
  np.testing.assert_array_equal(images.read_rgb(str(tmp_path / 'g8.png')), np.repeat(grey[..., None], 3, axis=-1))


@pytest.mark.parametrize('mode, extension', [('RGB', 'png'), ('RGB', 'jpg'), ('RGB', 'tif'), ('RGB', 'webp'),
                                             ('L', 'png'), ('LA', 'png'), ('RGBA', 'png'), ('P', 'png'),
                                             ('CMYK', 'jpg'), ('I;16', 'tif')])
def test_every_mode_and_format_is_rgb_uint8_as_pil_converts_it(rgb8, tmp_path, mode, extension):
  base = PIL.Image.fromarray(rgb8)
  if mode == 'I;16':
    source = PIL.Image.fromarray(rgb8[..., 1].astype(np.uint16) * 257)
  elif mode == 'LA':
    source = base.convert('L').convert('LA')
  else:
    source = base.convert(mode)
  path = str(tmp_path / f'image.{extension}')
  source.save(path, **({'lossless': True} if extension == 'webp' else {}))
  out = images.read_rgb(path)
  assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
  with PIL.Image.open(path) as opened:
    expected = (np.repeat(rgb8[..., 1:2], 3, axis=-1) if mode == 'I;16'
                else np.asarray(opened.convert('RGB')))   # the reference's conversion of 8-bit files
  np.testing.assert_array_equal(out, expected)


def test_alpha_is_dropped_for_evaluation_and_composited_for_data_generation(rgb8, tmp_path):
  alpha = np.zeros((24, 32), np.uint8)
  alpha[:, 16:] = 255
  path = str(tmp_path / 'rgba.png')
  PIL.Image.fromarray(np.dstack([rgb8, alpha])).save(path)
  np.testing.assert_array_equal(images.read_rgb(path), rgb8)
  white = images.read_rgb(path, alpha='white')
  np.testing.assert_array_equal(white[:, :16], 255)
  np.testing.assert_array_equal(white[:, 16:], rgb8[:, 16:])
  np.testing.assert_array_equal(segments.read_image(path), white)


def test_truncated_and_missing_files_name_the_file(rgb8, tmp_path):
  path = str(tmp_path / 'cut.jpg')
  PIL.Image.fromarray(rgb8).save(path, quality=95)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(errors.ImageError, match=r'cut\.jpg: unreadable or corrupt image'):
    images.read_rgb(path)
  with pytest.raises(errors.ImageError, match=r'gone\.png: no such image file'):
    images.load_image(str(tmp_path / 'gone.png'), (32, 32))
  with pytest.raises(errors.ConfigError, match='multiples of 16'):
    images.load_image(path, (30, 32))
