"""Re-ranking a baseline's top-K for place recognition (Tokyo 24/7, Pitts30k), docs/reference.md §4-5.

Pipeline: baseline ranking -> database features of every candidate in anyone's top-K, cached on disk
once -> per query (queries spread over processes): query features, self-pair mask, all K candidates
scored in sharded batches -> process 0 gathers the scores, re-sorts each top-K by score (positions past K
keep the baseline order), and reports Recall@N for the baseline and the re-ranked order, with and
without the spatial NMS where the benchmark has one; rankings and the table go to JSON.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from eval import feature_cache, place_formats, resumable, retrieval
from segswap_jax import checkpoints
from segswap_jax import cli
from segswap_jax import compilation_cache
from segswap_jax import images
from segswap_jax import inference
from segswap_jax import multihost
from segswap_jax.errors import DataError

IMAGE_SIZE = (480, 640)  # the reference's (height, width): 30 x 40 cells


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a benchmark's files are, relative to --data-dir, and how it is scored."""
  name: str
  npy_files: Dict[str, str]  # item -> file name (place_formats.ITEMS)
  mat_file: str
  ranking_file: str
  qry_subdir: str
  db_subdir: str
  nms_group: Optional[int]  # None: no spatial NMS


@dataclasses.dataclass
class Settings:
  topk: int = 100
  batch_size: int = 32
  denormalize_candidates: bool = False
  dist_threshold: float = 25.0
  recall_ns: Sequence[int] = retrieval.RECALL_NS
  cache_dir: str = 'feature_cache'
  cache_dtype: str = 'float16'
  num_queries: Optional[int] = None  # evaluate only the first N queries (quick checks)
  cache_format: str = 'backbone'     # or 'projected' (feature_cache.CandidateStore)
  image_size: Sequence[int] = IMAGE_SIZE  # (height, width)


def evaluate(dataset: place_formats.PlaceDataset, baseline: np.ndarray, baseline_source: str,
             params: Dict, config, settings: Settings, nms_group: Optional[int],
             work_dir: str, digests: Optional[Dict[str, str]] = None) -> Optional[Dict]:
  """Re-ranks and scores; returns the results dict on process 0 (None elsewhere).

  Args:
    dataset: lists, positions and image folders.
    baseline: the baseline file's array (score or index matrix; see `retrieval.baseline_ranking`).
    baseline_source: its path, for messages.
    params, config: the model.
    settings: evaluation settings.
    nms_group: database images per place for the spatial NMS (Tokyo: 12), or None.
    work_dir: folder for resumable per-query results (keyed on the model's fingerprint and every setting
      that changes the numbers: a rerun with another model or setting starts over).
    digests: the checkpoint's parameter digests (`checkpoints.load_verified`); computed when not given.
  """
  max_n = max(settings.recall_ns)
  depth = max(settings.topk, max_n, (nms_group or 1) * max_n)
  if baseline.ndim == 2 and baseline.shape[0] != dataset.num_queries:
    raise DataError(f'{baseline_source} has {baseline.shape[0]} rows but {dataset.sources["qry_list"]} lists '
                    f'{dataset.num_queries} queries')
  ranking = retrieval.baseline_ranking(baseline, dataset.num_db, depth, baseline_source)
  num_queries = dataset.num_queries if settings.num_queries is None else min(settings.num_queries,
                                                                             dataset.num_queries)
  ranking = ranking[:num_queries]
  topk = min(settings.topk, ranking.shape[1])
  candidates = ranking[:, :topk]

  model = inference.SegSwap(params, config, digests=digests)
  batch_size = inference.balanced_batch_size(topk, settings.batch_size, model.num_devices)
  size = tuple(settings.image_size)
  normalization = 'denormalized' if settings.denormalize_candidates else 'imagenet'
  cache = feature_cache.model_feature_cache(settings.cache_dir, model.digests['backbone'], size,
                                            normalization, settings.cache_dtype, config.feature_dim,
                                            compute_dtype=model.config.get('compute_dtype', 'float32'))
  db_names = [dataset.db_names[i] for i in np.unique(candidates)]
  load_db = lambda name: images.load_image(place_formats.resolve(name, [dataset.db_dir]), size)
  start = time.time()
  computed = cache.fill(db_names, load_db,
                        lambda batch: model.features(batch, normalization, batch_size=len(batch)),
                        batch_size, jax.process_index(), jax.process_count(), multihost.barrier)
  store = feature_cache.CandidateStore(model, cache, db_names, settings.cache_format, settings.cache_dir,
                                       batch_size, feature_cache.device_budget_bytes(), jax.process_index(),
                                       jax.process_count(), multihost.barrier)
  cache_s = time.time() - start

  local = multihost.query_shard(num_queries)
  key = {'dataset': dataset.sources, 'baseline': baseline_source, 'topk': topk, 'num_queries': num_queries,
         'cache': cache.meta, 'model': model.fingerprint, 'cache_format': settings.cache_format}
  progress = resumable.QueryProgress(work_dir, jax.process_index(), {'scores': ((topk,), 'float32')},
                                     len(local), key)
  start = time.time()
  scored = 0
  for i in tqdm(range(len(local)), desc='queries', disable=jax.process_index() != 0,
                initial=int(progress.done.sum())):
    if progress.done[i]:
      continue
    q = local[i]
    query = images.load_image(place_formats.resolve(dataset.qry_names[q], [dataset.qry_dir]), size)
    feat_q = model.features(query[None])[0]
    rows = cache.rows([dataset.db_names[j] for j in candidates[q]])
    result = model.score_candidates(feat_q, topk, lambda positions: store.read(rows[positions]),
                                    batch_size=batch_size)
    progress.set(i, scores=result['score'])
    scored += topk
  progress.flush()
  score_s = time.time() - start
  scores = multihost.gather_rows(progress.arrays['scores'], num_queries)
  if jax.process_index() != 0:
    return None

  reranked = retrieval.rerank(ranking, scores)
  variants = {'baseline': ranking, 're-ranked': reranked}
  if nms_group:
    variants['baseline + NMS'] = retrieval.spatial_nms(ranking, nms_group)
    variants['re-ranked + NMS'] = retrieval.spatial_nms(reranked, nms_group)
  qry_utm = dataset.qry_utm[:num_queries]
  recalls = {name: retrieval.recall_at_n(r, qry_utm, dataset.db_utm, settings.recall_ns,
                                         settings.dist_threshold) for name, r in variants.items()}
  return {
      'settings': dict(dataclasses.asdict(settings), topk=topk, image_size=list(size),
                       compute_dtype=model.config.get('compute_dtype', 'float32'),
                       nms_group=nms_group, num_queries=num_queries),
      'sources': dict(dataset.sources, baseline=baseline_source, qry_dir=dataset.qry_dir,
                      db_dir=dataset.db_dir, feature_cache=cache.directory),
      'recall': {name: {str(n): v for n, v in rec.items()} for name, rec in recalls.items()},
      'table': retrieval.recall_table(recalls),
      'timing': {'cache_fill_s': cache_s, 'db_images_computed': computed, 'scoring_s': score_s,
                 'cache_bytes_per_image': store.bytes_per_image, 'candidates_on_device': store.on_device,
                 'db_tokens_computed': store.computed_tokens,
                 'candidates_scored': scored * jax.process_count(),
                 'candidates_per_s': scored / score_s if scored and score_s > 0 else None,
                 'batch_per_call': batch_size, 'devices_per_process': model.num_devices,
                 'processes': jax.process_count()},
      'queries': [{'name': dataset.qry_names[q],
                   'baseline': ranking[q, :topk].tolist(),
                   'reranked': reranked[q, :topk].tolist(),
                   'scores': [round(float(s), 6) for s in scores[q]]} for q in range(num_queries)],
  }


def build_parser(layout: Layout, description: str) -> cli.Parser:
  parser = cli.parser(f'python -m eval.{layout.name}', description,
                      f'python -m eval.{layout.name} --checkpoint CKPT --data-dir data/{layout.name} '
                      f'--out results/{layout.name}.json')
  cli.add_checkpoint(parser)
  cli.add_data_dir(parser, 'dataset root (see docs/retrieval.md for the layout)')
  parser.add_argument('--topk', type=cli.positive_int, default=100, help='baseline candidates re-ranked per query')
  cli.add_batch_size(parser, 32, 'candidates per forward call (all local devices)')
  cli.add_out(parser, 'results JSON', default=f'{layout.name}_results.json')
  parser.add_argument('--denormalize-candidates', action='store_true',
                      help='feed candidates as x*std+mean like the released loader (docs/reference.md §10)')
  parser.add_argument('--source', choices=('auto', 'npy', 'mat'), default='auto',
                      help='lists/positions from the .npy files, the dbStruct .mat, or each from whichever exists')
  parser.add_argument('--lists-dir', default=None, help='folder of the .npy lists (default: --data-dir)')
  parser.add_argument('--mat', default=None, help=f'dbStruct .mat (default: DATA_DIR/{layout.mat_file})')
  parser.add_argument('--ranking', default=None,
                      help=f'baseline scores / indices (default: LISTS_DIR/{layout.ranking_file})')
  parser.add_argument('--qry-dir', default=None, help=f'query images (default: DATA_DIR/{layout.qry_subdir})')
  parser.add_argument('--db-dir', default=None, help=f'database images (default: DATA_DIR/{layout.db_subdir})')
  parser.add_argument('--dist-threshold', type=cli.positive_float, default=25.0,
                      help='metres for a correct match (default 25)')
  parser.add_argument('--cache-dir', default=None, help='feature cache root (default: OUT_dir/feature_cache)')
  parser.add_argument('--cache-dtype', choices=('float16', 'float32'), default='float16')
  parser.add_argument('--num-queries', type=cli.positive_int, default=None,
                      help='only the first N queries (quick check)')
  cli.add_image_size(parser, IMAGE_SIZE, 'input size of queries and candidates (the reference: 480 640)')
  cli.add_compute(parser)
  cli.add_multihost(parser)
  return parser


def run_cli(layout: Layout, description: str, argv: Optional[List[str]] = None) -> int:
  """Parses flags, runs `evaluate`, prints the table, writes the JSON (process 0). Returns the exit code."""
  args = build_parser(layout, description).parse_args(argv)
  multihost.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  compilation_cache.enable()
  lists_dir = args.lists_dir or args.data_dir
  dataset = place_formats.load_place_dataset(
      {item: os.path.join(lists_dir, name) for item, name in layout.npy_files.items()},
      args.mat or os.path.join(args.data_dir, layout.mat_file),
      args.qry_dir or os.path.join(args.data_dir, layout.qry_subdir),
      args.db_dir or os.path.join(args.data_dir, layout.db_subdir), args.source)
  ranking_path = args.ranking or os.path.join(lists_dir, layout.ranking_file)
  baseline = retrieval.load_npy(ranking_path, 'baseline ranking', mmap=True)
  params, config, digests = checkpoints.load_verified(args.checkpoint)
  config = cli.compute_config(config, args.compute_dtype)
  settings = Settings(topk=args.topk, batch_size=args.batch_size,
                      denormalize_candidates=args.denormalize_candidates, dist_threshold=args.dist_threshold,
                      cache_dir=args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                                               'feature_cache'),
                      cache_dtype=args.cache_dtype, num_queries=args.num_queries, cache_format=args.cache_format,
                      image_size=tuple(args.image_size))
  results = evaluate(dataset, baseline, ranking_path, params, config, settings, layout.nms_group,
                     work_dir=args.out + '.partial', digests=digests)
  if results is not None:
    results = dict({'dataset': layout.name, 'checkpoint': os.path.abspath(args.checkpoint)}, **results)
    retrieval.write_json(args.out, results)
    shutil.rmtree(args.out + '.partial', ignore_errors=True)  # finished: nothing left to resume
    print(results['table'])
    print(f'wrote {args.out}')
  return 0
