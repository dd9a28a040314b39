"""reward: a reward model trained from the SFT model.

`reward.kind: pairwise` (default): TRL's RewardTrainer on preference pairs, with the pairwise ranking loss
-log σ(r_chosen − r_rejected); pairs with a `margin` column get the Llama-2 margin loss
-log σ(r_chosen − r_rejected − margin). Held-out pairwise accuracy is reported as `eval_accuracy`.
`reward.kind: multi_aspect`: one regression head per rated aspect, see `stages.multi_aspect`.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from stages.data import load_rows
from stages.models import load_scorer, load_tokenizer
from stages.runner import StageContext
from stages.training import peft_config, train_evaluate_save, training_arguments


def run(ctx: StageContext) -> dict[str, Any]:
    if ctx.config.reward.kind == "multi_aspect":
        from stages import multi_aspect

        return multi_aspect.run(ctx)
    config = ctx.config.reward
    sft_dir = str(ctx.inputs["sft"])
    tokenizer = load_tokenizer(sft_dir)
    prepared = ctx.inputs["prepare"]
    lora = peft_config(config.lora)
    if lora is not None:
        lora.task_type = "SEQ_CLS"
    trainer = RewardTrainer(
        model=load_scorer(sft_dir, ctx.device, tokenizer.pad_token_id),
        args=RewardConfig(
            center_rewards_coefficient=config.center_rewards_coefficient,
            **training_arguments(ctx, config, ctx.work_dir / "trainer"),
        ),
        train_dataset=Dataset.from_list(load_rows(prepared / "preference_train.jsonl")),
        eval_dataset=Dataset.from_list(load_rows(prepared / "preference_eval.jsonl")),
        processing_class=tokenizer,
        peft_config=lora,
    )
    return train_evaluate_save(trainer, ctx, {"eval_accuracy": "eval_accuracy", "eval_loss": "eval_loss"})
