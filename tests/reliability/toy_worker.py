"""A training run in its own process, for signal / kill tests: the toy trainer of
tests/train/test_loop_core.py. Usage: toy_worker.py OUTPUT_DIR TOTAL_STEPS RESUME STEP_DELAY"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dataclasses  # noqa: E402

from jaxrl_llm.train.loop import RunConfig  # noqa: E402
from jaxrl_llm.train.optim import OptimConfig  # noqa: E402
from tests.train.test_loop_core import ToyConfig, toy_train  # noqa: E402

if __name__ == "__main__":
    out, steps, resume, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
    config = ToyConfig(run=RunConfig(output_dir=out, total_steps=steps, checkpoint_every=1, keep_checkpoints=2,
                                     resume=resume, progress=False, export_hf=False),
                       optim=OptimConfig(learning_rate=0.05, schedule="cosine", warmup_steps=2))
    toy_train(dataclasses.replace(config), step_delay=delay)
    print("DONE", flush=True)
