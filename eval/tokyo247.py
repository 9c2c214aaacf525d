r"""Tokyo 24/7 re-ranking evaluation (docs/reference.md §4-5).

  python -m eval.tokyo247 --checkpoint checkpoints/segswap_official --data-dir data/Tokyo247 \
      --topk 100 --batch-size 32 --out results/tokyo247.json

Expected under --data-dir (see docs/retrieval.md): query/247query_subset_v2/, database/, and either the
reference's qry_list.npy, qry_utm.npy, db_list.npy, db_utm.npy or NetVLAD's tokyo247.mat (mixable), plus
the baseline top100_patchVlad.npy (query x database scores, or query x K database indices). Reports
Recall@1/5/10/100 for the baseline and the re-ranked order, each with and without the spatial NMS over
the 12 cut-outs of a panorama. --denormalize-candidates reproduces the released candidate loader.
"""
import sys

from eval import place_recognition
from segswap_jax import cli

LAYOUT = place_recognition.Layout(
    name='tokyo247',
    npy_files={'qry_list': 'qry_list.npy', 'qry_utm': 'qry_utm.npy', 'db_list': 'db_list.npy',
               'db_utm': 'db_utm.npy'},
    mat_file='tokyo247.mat',
    ranking_file='top100_patchVlad.npy',
    qry_subdir='query/247query_subset_v2',
    db_subdir='database',
    nms_group=12,
)


@cli.command
def main(argv=None) -> int:
  return place_recognition.run_cli(LAYOUT, __doc__, argv)


if __name__ == '__main__':
  sys.exit(main())
