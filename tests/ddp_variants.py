"""Worker of tests/test_distributed.py::test_every_variant_and_fusion_mode_trains_under_ddp.

Run under torchrun with 2 processes: ``ddp_variants.py REPO_ROOT WORK_DIR``. One process
group serves every run (the trainer uses a group its caller opened). Each case of CASES
trains 4 steps uninterrupted, and (``resume``) 2 steps, then resumes to 4; rank 0 writes
the step-4 digests of both to WORK_DIR/digests.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from timellm_lib.config import load_config
from timellm_lib.notebooks.describe import describe_checkpoint
from timellm_lib.training import train

# (name, ablation config, overrides, check resume): every variant and every fusion mode
CASES = [
    ("baseline", "baseline", [], True),
    ("tapr", "tapr", [], True),
    ("gram", "gram", [], True),
    ("full", "full", [], True),
    ("tapr fusion=off", "tapr", ["model.fusion=off"], True),
    ("full fusion=off", "full", ["model.fusion=off"], False),
    ("full fusion=train_only", "full", ["model.fusion=train_only"], False),
    ("full multiplicative", "full", ["model.fusion_form=multiplicative"], False),
    ("gram without memory", "gram", ["model.build_memory=false"], True),
    ("full channel samples", "full", ["data.sample_unit=channel", "data.batch_size=8"], False),
]
STEPS = 4


def main(repo_root: Path, work: Path) -> None:
    dist.init_process_group("gloo")
    common = [
        f"data.path={work / 'synthetic.csv'}",
        "train.threads=1",
        "train.device=cpu",
        "train.log_steps=1",
        "model.llm_layers=1",
    ]
    digests = {}
    for name, variant, extra, resume in CASES:
        cfg = load_config(repo_root / f"configs/ablation/{variant}.yaml", [*common, *extra])
        runs = {"reference": work / name / "reference", "resumed": work / name / "resumed"}
        train(cfg, run_dir=runs["reference"], max_steps=STEPS, progress=False)
        if resume:
            train(cfg, run_dir=runs["resumed"], max_steps=STEPS // 2, progress=False)
            train(cfg, run_dir=runs["resumed"], max_steps=STEPS, resume="auto", progress=False)
        if dist.get_rank() == 0:
            digests[name] = {
                key: describe_checkpoint(path / "checkpoints" / f"step_{STEPS:08d}.pt")[
                    "resume_digest"
                ]
                for key, path in runs.items()
                if resume or key == "reference"
            }
    if dist.get_rank() == 0:
        (work / "digests.json").write_text(json.dumps(digests, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
