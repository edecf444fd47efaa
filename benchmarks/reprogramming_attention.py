"""How selective the reprogramming attention is: its entropy over the text prototypes.

Time-LLM turns each patch into a mixture of text prototypes by cross-attention. If that
attention is uniform, every patch gets the same mixture and the language model sees nothing
of the series (README, Results). This prints one JSON line for a model at initialisation
(``--config``) or trained (``--checkpoint``), traced on evenly spaced windows of a split:

    python benchmarks/reprogramming_attention.py --config configs/etth1_512_96.yaml
    python benchmarks/reprogramming_attention.py --checkpoint RUN/checkpoints/best.pt

``entropy`` is the mean over heads and patches (nats), ``uniform_entropy`` = log(prototypes),
``max_weight`` the mean largest weight of a patch (1/prototypes when uniform).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from timellm_lib.config import load_config
from timellm_lib.data import build_datasets
from timellm_lib.evaluation.inference import load_for_inference
from timellm_lib.models import build_model
from timellm_lib.models.timellm import TimeLLM


def attention_weights(model: TimeLLM, x: torch.Tensor) -> torch.Tensor:
    """The reprogramming layer's attention weights [heads, patches, prototypes] on ``x``."""
    seen = {}
    layer = model.reprogramming
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.update(args=args))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
            patches, prototypes = seen["args"]
            rows, heads = patches.shape[0] * patches.shape[1], layer.n_heads
            q = layer.query(patches).reshape(rows, heads, -1).transpose(0, 1)
            k = layer.key(prototypes).reshape(-1, heads, q.shape[-1]).transpose(0, 1)
            return (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1)
    finally:
        handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a model at initialisation (seed 0)")
    source.add_argument("--checkpoint", help="a trained model")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.checkpoint:
        loaded = load_for_inference(args.checkpoint, overrides=args.overrides)
        model, windows = loaded.model, loaded.datasets.split(args.split)
    else:
        cfg = load_config(args.config, args.overrides)
        datasets = build_datasets(cfg.data)
        model = build_model(cfg, datasets.n_in, datasets.n_out)
        windows = datasets.split(args.split)
    if not isinstance(model, TimeLLM) or model.backbone is None:
        raise SystemExit("the model has no reprogramming layer (model.llm_ablation=no_llm?)")
    x, _ = windows.get_batch(torch.linspace(0, len(windows) - 1, args.windows).long())
    weights = attention_weights(model, x)
    entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1)
    print(
        json.dumps(
            {
                "source": args.checkpoint or args.config,
                "windows": len(x),
                "prototypes": weights.shape[-1],
                "entropy": entropy.mean().item(),
                "uniform_entropy": math.log(weights.shape[-1]),
                "max_weight": weights.max(-1).values.mean().item(),
            }
        )
    )


if __name__ == "__main__":
    main()
