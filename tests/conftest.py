import os
import sys
from pathlib import Path

# One thread per process keeps the 2-core CI machines from oversubscribing under forked ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)
