"""On-disk formats of the place-recognition benchmarks (Tokyo 24/7, Pitts30k): image lists, UTM positions,
baseline rankings, NetVLAD's `.mat` dbStruct (docs/reference.md §5), and where a list entry's image is.

Two sources of lists and positions, mixable item by item:
  * the reference's .npy files: query list, database list (names relative to the query / database
    folders), query and database UTM `(n, 2)` = (easting, northing) in metres;
  * NetVLAD's dbStruct `.mat` (scipy.io.loadmat), fields by position: 0 whichSet, 1 dbImageFns,
    2 utmDb `(2, Ndb)`, 3 qImageFns, 4 utmQ `(2, Nq)`, 5 numImages, 6 numQueries, 7 posDistThr, ...
Each item comes from its .npy file when present, else from the .mat. When positions come from a .npy
and names from the .mat, the .mat positions must agree with the .npy ones (this checks that both are
in the same order: the reference's `db_list.npy` is not distributed, only `db_utm.npy`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from eval.retrieval import load_npy
from segswap_jax.errors import DataError

ITEMS = ('qry_list', 'qry_utm', 'db_list', 'db_utm')


@dataclasses.dataclass
class PlaceDataset:
  """Lists and positions of one benchmark; `sources` names the file each item came from."""
  qry_names: List[str]
  qry_utm: np.ndarray  # (Nq, 2) float64
  db_names: List[str]
  db_utm: np.ndarray  # (Ndb, 2) float64
  qry_dir: str
  db_dir: str
  sources: Dict[str, str]

  @property
  def num_queries(self) -> int:
    return len(self.qry_names)

  @property
  def num_db(self) -> int:
    return len(self.db_names)


def read_name_list(path: str, what: str) -> List[str]:
  names = load_npy(path, what)
  if names.ndim != 1 or not (names.dtype.kind in 'US' or names.size == 0):
    raise DataError(f'{what}: expected a 1-D array of strings in {path}, got {names.dtype} {names.shape}')
  return [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]


def read_utm(path: str, what: str) -> np.ndarray:
  utm = load_npy(path, what)
  if utm.ndim != 2 or utm.shape[1] != 2 or not np.issubdtype(utm.dtype, np.number):
    raise DataError(f'{what}: expected (n, 2) UTM easting, northing in {path}, got {utm.dtype} {utm.shape}')
  return np.asarray(utm, np.float64)


def _mat_strings(cell, path: str, field: str) -> List[str]:
  out = []
  for entry in np.asarray(cell, dtype=object).ravel():
    values = np.asarray(entry).ravel()
    if values.size != 1:
      raise DataError(f'{path}: dbStruct.{field} holds a non-string entry {entry!r}')
    out.append(str(values[0]).strip())
  return out


def _mat_utm(value, path: str, field: str, count: int) -> np.ndarray:
  utm = np.asarray(value, np.float64)
  if utm.shape != (2, count):
    raise DataError(f'{path}: dbStruct.{field} has shape {utm.shape}, expected (2, {count})')
  return utm.T.copy()


def read_db_struct(path: str) -> Dict:
  """Reads a NetVLAD dbStruct .mat: db_list, db_utm, qry_list, qry_utm, pos_dist_thr (fields by position)."""
  import scipy.io
  if not os.path.isfile(path):
    raise DataError(f'dbStruct: file not found: {path}')
  try:
    mat = scipy.io.loadmat(path)
  except NotImplementedError:
    raise DataError(f'{path} is a MATLAB v7.3 (HDF5) file; save it as a v7 .mat (NetVLAD layout)') from None
  except (ValueError, OSError, TypeError) as e:
    raise DataError(f'cannot read {path} as a .mat file ({e})') from None
  if 'dbStruct' not in mat:
    raise DataError(f'{path}: no variable dbStruct (found {sorted(k for k in mat if not k.startswith("__"))})')
  struct = np.asarray(mat['dbStruct']).ravel()
  if struct.size != 1 or struct.dtype.names is None or len(struct.dtype.names) < 8:
    raise DataError(f'{path}: dbStruct is not a NetVLAD struct with >= 8 fields')
  fields = struct[0].item()
  db_names = _mat_strings(fields[1], path, 'dbImageFns')
  qry_names = _mat_strings(fields[3], path, 'qImageFns')
  return {
      'db_list': db_names,
      'db_utm': _mat_utm(fields[2], path, 'utmDb', len(db_names)),
      'qry_list': qry_names,
      'qry_utm': _mat_utm(fields[4], path, 'utmQ', len(qry_names)),
      'pos_dist_thr': float(np.asarray(fields[7]).ravel()[0]),
  }


def load_place_dataset(npy_files: Dict[str, str], mat_path: Optional[str], qry_dir: str, db_dir: str,
                       source: str = 'auto') -> PlaceDataset:
  """Loads lists and positions from the .npy files and/or the dbStruct .mat.

  Args:
    npy_files: item (one of ITEMS) -> .npy path.
    mat_path: dbStruct .mat path (may be None or missing when every .npy exists).
    qry_dir, db_dir: image folders the names are relative to.
    source: 'npy' (all four .npy files), 'mat' (the .mat only) or 'auto' (each item from its .npy when
      present, else from the .mat).
  """
  use_npy = {item: source == 'npy' or (source == 'auto' and os.path.isfile(npy_files[item]))
             for item in ITEMS}
  mat = None
  if not all(use_npy.values()):
    if not mat_path or not os.path.isfile(mat_path):
      missing = [npy_files[i] for i in ITEMS if not use_npy[i]]
      raise DataError(f'file not found: {missing[0]} (and no dbStruct .mat at {mat_path} to take '
                      f'{", ".join(i for i in ITEMS if not use_npy[i])} from)')
    mat = read_db_struct(mat_path)
  values, sources = {}, {}
  for item in ITEMS:
    if use_npy[item]:
      reader = read_name_list if item.endswith('_list') else read_utm
      values[item], sources[item] = reader(npy_files[item], item), npy_files[item]
    else:
      values[item], sources[item] = mat[item], f'{mat_path}:{item}'
  for side in ('qry', 'db'):
    names, utm = values[f'{side}_list'], values[f'{side}_utm']
    if len(names) != len(utm):
      raise DataError(f'{sources[side + "_list"]} has {len(names)} names but {sources[side + "_utm"]} has '
                      f'{len(utm)} positions')
    if mat is not None and use_npy[f'{side}_utm'] and not use_npy[f'{side}_list']:
      if mat[f'{side}_utm'].shape != utm.shape or not np.allclose(mat[f'{side}_utm'], utm, atol=0.01):
        raise DataError(f'{sources[side + "_utm"]} disagrees with {mat_path} {side} positions: the .mat '
                        'names are not in the order of the .npy positions')
  if not values['qry_list'] or not values['db_list']:
    raise DataError(f'empty query or database list ({sources["qry_list"]}, {sources["db_list"]})')
  return PlaceDataset(values['qry_list'], values['qry_utm'], values['db_list'], values['db_utm'],
                      qry_dir, db_dir, sources)


# Some copies of the datasets ship .png where the lists say .jpg (Tokyo 24/7) and vice versa.
_SWAPPABLE_EXTENSIONS = ('.jpg', '.png', '.jpeg')


def resolve(name: str, roots: Sequence[str]) -> str:
  """Finds the file for a list entry under the first root that has it.

  Tried per root, in order: `root/name`, then with the other image extension, then the bare file name
  (lists written for another folder layout) and its other extension.

  Raises DataError naming the entry and the first path tried when nothing exists.
  """
  variants = []
  for base in dict.fromkeys([name, os.path.basename(name)]):
    stem, ext = os.path.splitext(base)
    variants.append(base)
    if ext.lower() in _SWAPPABLE_EXTENSIONS:
      variants += [stem + e for e in _SWAPPABLE_EXTENSIONS if e != ext.lower()]
  for root in roots:
    for variant in variants:
      path = os.path.join(root, variant)
      if os.path.isfile(path):
        return path
  raise DataError(f'image not found: {os.path.join(roots[0], name)} (list entry {name!r})')

