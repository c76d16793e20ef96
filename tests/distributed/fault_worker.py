"""One rank of a 2-process job in which rank 1 dies or hangs at its 7th micro-batch.

RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python fault_worker.py CFG die
"""

from __future__ import annotations

import os
import sys
import time

from plinth.config.load import load_config
from plinth.errors import PlinthError
from plinth.recipes.pretrain import run_pretraining

config, mode, *overrides = sys.argv[1:]
rank = int(os.environ["RANK"])


def hook(micro: int, loss):
    if rank == 1 and micro == 6:
        if mode == "die":
            os._exit(3)
        time.sleep(3600)  # hang: the other rank must give up on its own
    return loss


try:
    run_pretraining(load_config([config], overrides), progress=False, fault_hook=hook)
except PlinthError as e:
    print(f"error: {e}", flush=True)
    sys.exit(1)
