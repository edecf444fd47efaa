"""Tiny Time-LLM sizes shared by the model tests (imported like trainer_helpers)."""

# P = (32 - 8)//4 + 2 = 8 patches, d_ff 16 <= llm_dim 128 of the tiny random GPT-2, no dropout
TINY_MODEL = {
    "backbone": "tiny-random-gpt2",
    "patch_len": 8,
    "stride": 4,
    "d_model": 8,
    "d_ff": 16,
    "n_heads": 2,
    "num_tokens": 16,
    "dropout": 0.0,
}


def whole_prompts(stats, hp) -> list[str]:
    """Each series' whole prompt text as the model builds it: the shared head, then its tail
    (``hp``: the model's PromptParams)."""
    from timellm_lib.models.prompt import prompt_head, prompt_tails

    return [prompt_head(hp) + tail for tail in prompt_tails(stats, hp)]
