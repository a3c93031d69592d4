"""Cross-tokenizer knowledge transfer (methods.md §6), as pure functions every method can reuse.

- `vocab`: MinED vocabulary maps between any two Hugging Face tokenizers, cached on disk.
- `sequence`: which sender position corresponds to which receiver position (character offsets,
  or DTW over token strings).
- `project`: a sender's top-k distribution carried into the receiver's vocabulary.
- `targets`: the glue for soft-label KD — each example encoded by both tokenizers, and a batch of
  aligned, projected teacher targets (`TopKTargets`) for the student's KD rows.
"""

from kdflow.align.project import project_topk
from kdflow.align.sequence import boundary_points, pair_by_dtw, pair_by_points
from kdflow.align.vocab import VocabMaps, canonical_vocab, mined_map, vocab_maps

__all__ = ["VocabMaps", "boundary_points", "canonical_vocab", "mined_map", "pair_by_dtw", "pair_by_points",
           "project_topk", "vocab_maps"]
