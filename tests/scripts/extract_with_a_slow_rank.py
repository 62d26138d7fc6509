"""Under `accelerate launch --num_processes 2`: both ranks extract the same volumes into one cache, rank 1 starting
late, as a slower node does (rank 0 has written files by then). Prints the index's volume count on rank 0.

    accelerate launch --multi_gpu --num_processes 2 extract_with_a_slow_rank.py OUT VOLUME ...
"""

import sys
import time

from braindino.train.encoding.backbones import load_backbone
from braindino.train.encoding.feature_cache import FeatureCache, process_state

out, *volumes = sys.argv[1:]
backbone = load_backbone(preset="tiny", num_slices=None, size=64, dtype="float32", device="cpu")
state = process_state(backbone)
if state.process_index == 1:
    time.sleep(10)
index = FeatureCache(out, backbone).extract(volumes, progress=False)
print(f"rank {state.process_index}: {len(index['volumes'])} volumes, {len(index['failed'])} failed")
