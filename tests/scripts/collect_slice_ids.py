"""Run under `accelerate launch --num_processes 2 --cpu`: each rank streams its share of a corpus for two
epochs and writes the slice ids it saw, so the test can check nothing is lost or doubled."""

import json
import sys
from pathlib import Path

import datasets
from accelerate import Accelerator

from braindino.train.data.stream import slice_stream

datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0.2  # as in tests/conftest.py
corpus, out = sys.argv[1], Path(sys.argv[2])
accelerator = Accelerator(cpu=True)
stream = slice_stream(corpus, rank=accelerator.process_index, world_size=accelerator.num_processes, seed=7, shuffle_buffer=64)
epochs = []
for epoch in range(2):
    stream.set_epoch(epoch)
    epochs.append([f"{row['path']}#{row['slice_index']}" for row in stream])
(out / f"rank{accelerator.process_index}.json").write_text(
    json.dumps({"world_size": accelerator.num_processes, "epochs": epochs})
)
accelerator.wait_for_everyone()
