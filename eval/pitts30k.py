r"""Pitts30k-test re-ranking evaluation (docs/reference.md §4-5).

  python -m eval.pitts30k --checkpoint checkpoints/segswap_official --data-dir data/Pitts \
      --topk 100 --batch-size 32 --out results/pitts30k.json

Expected under --data-dir (the Pittsburgh 250k root, see docs/retrieval.md): database images by their
list names (e.g. 000/000829_pitch1_yaw1.jpg), queries_real/, and either the reference's
pitts_test_qry_list.npy, pitts_test_qry_utm.npy, pitts_test_db_list.npy, pitts_test_db_utm.npy or
NetVLAD's pitts30k_test.mat (mixable), plus the baseline top100_patchVlad.npy. Reports Recall@1/5/10/100
(25 m) for the baseline and the re-ranked order; no spatial NMS. --denormalize-candidates reproduces the
released candidate loader.
"""
import sys

from eval import place_recognition
from segswap_jax import cli

LAYOUT = place_recognition.Layout(
    name='pitts30k',
    npy_files={'qry_list': 'pitts_test_qry_list.npy', 'qry_utm': 'pitts_test_qry_utm.npy',
               'db_list': 'pitts_test_db_list.npy', 'db_utm': 'pitts_test_db_utm.npy'},
    mat_file='pitts30k_test.mat',
    ranking_file='top100_patchVlad.npy',
    qry_subdir='queries_real',
    db_subdir='.',
    nms_group=None,
)


@cli.command
def main(argv=None) -> int:
  return place_recognition.run_cli(LAYOUT, __doc__, argv)


if __name__ == '__main__':
  sys.exit(main())
