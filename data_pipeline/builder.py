"""The TFDS dataset `segswap_pairs` (ArrayRecord), one builder config per segment source.

Features (docs/INTERFACES.md "Stored pairs"):
  image_a, image_b, image_a_styled, image_b_styled: uint8 (H, W, 3), stored as JPEG bytes that we encode
    with OpenCV (TFDS' own Image encoding needs TensorFlow); `tfds` decodes them on read, or pass
    `decoders=raw_image_decoders()` to get the bytes and decode only what you use (the loader does).
  corr_a, corr_b: float32 (h, w, 2), (x, y) in [0, 1] of the other image;
  mask_a, mask_b: float32 (h, w); num_objects: int32 (1 or 2); source: text;
  scene_a, scene_background: text keys of the scene A (and its pasted objects) comes from and of B's
    background ('' = unknown, e.g. imported reference pairs); training drops in-batch negatives whose
    images share a scene (since 1.1.0; 1.0.0 datasets read as unknown).
Splits: `train` and `validation` (held-out pairs). The generation config is kept in the dataset's
metadata (`info.metadata['generation']`) and `info.metadata['image_size']`.

Examples are not produced here: the builder copies already generated examples (work shards of
`generate.py`, or the reference's files for `import_reference.py`) from per-split iterables given to
`write_dataset`; keys are the pair indices, so the dataset depends only on the examples.
"""
from __future__ import annotations

import os
import types
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import cv2
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from segswap_jax.errors import DataError

NAME = 'segswap_pairs'
VERSION = '1.1.0'
SOURCES = ('bundled', 'folder', 'coco', 'reference')
IMAGE_FEATURES = ('image_a', 'image_b', 'image_a_styled', 'image_b_styled')

Example = Dict[str, object]


def features() -> tfds.features.FeaturesDict:
  """The feature spec; spatial sizes are left free (one spec for every image size)."""
  image = lambda: tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format='jpeg')
  return tfds.features.FeaturesDict({
      **{name: image() for name in IMAGE_FEATURES},
      # Free spatial sizes need an encoding; zlib also shrinks the mostly-zero masks.
      'corr_a': tfds.features.Tensor(shape=(None, None, 2), dtype=np.float32, encoding='zlib'),
      'corr_b': tfds.features.Tensor(shape=(None, None, 2), dtype=np.float32, encoding='zlib'),
      'mask_a': tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding='zlib'),
      'mask_b': tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding='zlib'),
      'num_objects': tfds.features.Scalar(dtype=np.int32),
      'source': tfds.features.Text(),
      'scene_a': tfds.features.Text(),
      'scene_background': tfds.features.Text(),
  })


class SegswapPairs(tfds.core.GeneratorBasedBuilder):
  """Synthetic co-segmentation pairs made by segment swapping (docs/reference.md §3)."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {
      '1.0.0': 'Segment-swapping pairs, JPEG images, 16-px-cell ground truth.',
      '1.1.0': 'Scene keys of A and of B\'s background (scene_a, scene_background).',
  }
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='bundled', description="scikit-image's bundled photographs, "
                              'unsupervised segments'),
      tfds.core.BuilderConfig(name='folder', description='an image folder, unsupervised segments'),
      tfds.core.BuilderConfig(name='coco', description='COCO instances'),
      tfds.core.BuilderConfig(name='reference', description="imported from the reference's files"),
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS' own lookup of a packaged builder's file needs the `importlib_resources` backport.
    return epath.Path(__file__)

  # Set by `write_dataset` before `download_and_prepare`.
  split_examples: Dict[str, Callable[[], Iterable[Tuple[int, Example]]]] = {}
  generation_metadata: Dict[str, object] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Synthetic co-segmentation pairs made by segment swapping (docs/reference.md section 3).',
        features=features(),
        metadata=tfds.core.MetadataDict(self.generation_metadata),
        homepage='https://arxiv.org/abs/2110.15904',
        citation='Shen, Efros, Joulin, Aubry. Learning Co-segmentation by Segment Swapping for '
                 'Retrieval and Discovery. CVPR 2022 workshops.',
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(make) for split, make in self.split_examples.items()}

  def _generate_examples(self, make) -> Iterator[Tuple[int, Example]]:
    yield from make()


def dataset_path(data_dir: str, source: str) -> str:
  """Where `write_dataset` puts a source's dataset: DATA_DIR/segswap_pairs/SOURCE/VERSION."""
  return os.path.join(data_dir, NAME, source, VERSION)


def write_dataset(data_dir: str, source: str,
                  split_examples: Dict[str, Callable[[], Iterable[Tuple[int, Example]]]],
                  metadata: Dict[str, object]) -> str:
  """Writes the ArrayRecord dataset from per-split example iterables; returns its directory."""
  if source not in SOURCES:
    raise DataError(f'unknown dataset source {source!r}; one of {SOURCES}')
  # A throw-away subclass carries this run's examples and metadata into `_info`/`_split_generators`.
  builder_cls = types.new_class('SegswapPairsWriter', (SegswapPairs,), {'skip_registration': True},
                                lambda ns: ns.update(name=NAME, split_examples=split_examples,
                                                     generation_metadata=metadata,
                                                     __module__=__name__))
  builder = builder_cls(config=source, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(verify_ssl=True))
  return str(builder.data_dir)


def resolve_dataset_dir(path: str, source: Optional[str] = None) -> str:
  """A dataset directory from itself or from the data dir given to `generate` (DATA_DIR).

  With several sources under DATA_DIR/segswap_pairs/, `source` picks one.
  """
  if os.path.isfile(os.path.join(path, 'dataset_info.json')):
    return path
  found = sorted(s for s in SOURCES if os.path.isfile(os.path.join(dataset_path(path, s),
                                                                     'dataset_info.json')))
  if source is not None:
    if source not in found:
      raise DataError(f'no {NAME}/{source} dataset under {path} (found: {", ".join(found) or "none"})')
    return dataset_path(path, source)
  if len(found) == 1:
    return dataset_path(path, found[0])
  if not found:
    raise DataError(f'no {NAME} dataset under {path} (expected {dataset_path(path, "SOURCE")} or a '
                    'directory holding dataset_info.json)')
  raise DataError(f'several {NAME} datasets under {path} ({", ".join(found)}); choose one')


def load_builder(path: str) -> tfds.core.DatasetBuilder:
  """The builder of a written dataset directory (the one holding dataset_info.json)."""
  if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
    raise DataError(f'not a segswap_pairs dataset directory (no dataset_info.json): {path}')
  return tfds.builder_from_directory(path)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  """RGB uint8 `(H, W, 3)` -> JPEG bytes (OpenCV)."""
  ok, data = cv2.imencode('.jpg', cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  if not ok:
    raise DataError(f'JPEG encoding failed for an image of shape {image.shape}')
  return data.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
  """JPEG bytes -> RGB uint8 `(H, W, 3)` (OpenCV)."""
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise DataError('stored image is not a decodable JPEG')
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def raw_image_decoders() -> Dict[str, tfds.decode.Decoder]:
  """Decoders that leave the four JPEG fields as bytes (decode with `decode_jpeg`)."""
  return {name: tfds.decode.SkipDecoding() for name in IMAGE_FEATURES}


def data_source(path: str, split: str, raw_images: bool = True):
  """Random-access source of one split of a written dataset (no TensorFlow needed)."""
  builder = load_builder(path)
  if split not in builder.info.splits:
    raise DataError(f'{path} has no split {split!r} (has {", ".join(builder.info.splits)})')
  return builder.as_data_source(split=split, decoders=raw_image_decoders() if raw_images else None)


def image_size(path: str) -> Optional[int]:
  """Image side length recorded in a dataset's metadata."""
  metadata = load_builder(path).info.metadata or {}
  size = metadata.get('image_size')
  return int(size) if size is not None else None
