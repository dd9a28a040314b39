"""Every RL and scoring code path on real tokenizers (from `make assets`), each under a small random Llama:

- `gpt2`: GPT-2's byte-level BPE, no chat template of its own (the default one: `<eos>\\n` after each turn) and
  no pad token (pad == eos);
- `smollm2`: SmolLM2's ChatML from the GGUF file: pad == eos == `<|im_end|>`, and the template writes `\\n` after it;
- `chatml-eos`: the same ChatML whose eos is `<|endoftext|>`, not the end of turn `<|im_end|>` (Qwen's base models).

The built-in word-level tokenizer has none of these traits, so the bugs they cause only show here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LogitsProcessor,
)

from rlhf_pipeline.stages.core.config import GenerationConfig
from rlhf_pipeline.stages.core.config_loading import load_config
from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.core.planner import plan_stage
from rlhf_pipeline.stages.core.store import LocalStore
from rlhf_pipeline.stages.modeling.chat_template import end_of_turn_ids, fit_prompt, fitting_prompts, prompt_ids
from rlhf_pipeline.stages.modeling.data_parallel import Processes
from rlhf_pipeline.stages.modeling.lengths import answerable, distinct_pairs, whole_pairs, whole_rated
from rlhf_pipeline.stages.modeling.loading import (
    load_policy,
    load_scorer,
    load_tokenizer,
    unwrap_adapter,
    weights_dtype,
)
from rlhf_pipeline.stages.modeling.lora import with_adapter
from rlhf_pipeline.stages.modeling.tiny_model import build_tokenizer
from rlhf_pipeline.stages.rlhf import rejection_sampling
from rlhf_pipeline.stages.rlhf.multi_aspect import fold_heads
from rlhf_pipeline.stages.rlhf.ppo import PhaseTimer, PPOTrainer
from rlhf_pipeline.stages.rlhf.reward_signal import load_reward_model
from rlhf_pipeline.stages.rlhf.rollout import (
    PromptSeededNoise,
    Rollout,
    own_generation_config,
    prompt_seeds,
    response_logprobs,
    sample,
    sampling_config,
    sampling_processors,
)
from rlhf_pipeline.stages.rlhf.scoring import conversation_scores, render, response_scores, rollout_scores
from rlhf_pipeline.stages.runner import run_stage, stage_context
from tests.conftest import REPO, TINY, forced_token

ASSETS = REPO / ".assets"
GGUF = ASSETS / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZERS = ("gpt2", "smollm2", "chatml-eos")
CPU = torch.device("cpu")

PROMPTS = [
    [{"role": "user", "content": "Describe the river at night."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What do you think of coffee?"}],
]
ANSWERS = ["It is calm and dark, with the town's lights on the water.", "Bright!"]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    assert GGUF.exists(), "run `make assets` first"
    root = tmp_path_factory.mktemp("tokenizers")
    GPT2TokenizerFast.from_pretrained(ASSETS / "gpt2-tokenizer").save_pretrained(root / "gpt2")
    chatml = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    chatml.save_pretrained(root / "smollm2")
    chatml.eos_token = chatml.pad_token = "<|endoftext|>"
    chatml.save_pretrained(root / "chatml-eos")
    return {name: root / name for name in TOKENIZERS}


def random_llama(tokenizer_dir: Path, out: Path, scorer: bool = False, attention_dropout: float = 0.0) -> str:
    """A two-layer, 32-wide Llama over the tokenizer's vocabulary, saved with the tokenizer as it came."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=attention_dropout,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    torch.manual_seed(0)
    (LlamaForSequenceClassification if scorer else LlamaForCausalLM)(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return str(out)


def rollout_of(tokenizer, prompts: list, answers: list[str], finished: list[bool]) -> Rollout:
    """A rollout as `sample` makes it, from known answers: each ended by the first end-of-turn id, or not."""
    end = end_of_turn_ids(tokenizer)[0]
    responses = [
        tokenizer(a, add_special_tokens=False)["input_ids"] + ([end] if f else [])
        for a, f in zip(answers, finished, strict=True)
    ]
    width = max(map(len, responses))
    prompt = tokenizer.pad(
        {"input_ids": [fit_prompt(tokenizer, p, None) for p in prompts]}, padding_side="left", return_tensors="pt"
    )
    response_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in responses])
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses])
    return Rollout(
        list(prompts),
        prompt["input_ids"],
        prompt["attention_mask"],
        response_ids,
        response_mask,
        torch.tensor(finished),
        tuple(end_of_turn_ids(tokenizer)),
    )


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_rollouts_score_is_its_conversations_score_through_the_template(name, tokenizer_dirs, tmp_path):
    """The one reward readout: PPO and rejection sampling score a sampled rollout exactly as the reward model
    was trained and evaluated, on the conversation rendered through the chat template (within 1e-5)."""
    source = random_llama(tokenizer_dirs[name], tmp_path / "rm", scorer=True)
    tokenizer = load_tokenizer(source)
    reward_model = load_scorer(source, CPU, tokenizer.pad_token_id).eval()
    prompts, answers = [*PROMPTS, PROMPTS[0]], [*ANSWERS, ANSWERS[0]]
    rollout = rollout_of(tokenizer, prompts, answers, finished=[True, True, False])
    scores = rollout_scores(reward_model, tokenizer, rollout).tolist()
    for i in (0, 1):  # each alone, unpadded: what the reward model trained on
        conversation = prompts[i] + [{"role": "assistant", "content": answers[i]}]
        assert scores[i] == pytest.approx(conversation_scores(reward_model, tokenizer, [conversation])[0], abs=1e-5)
    # An answer cut at max_new_tokens is scored without the template's turn ending: the model can tell it apart.
    text = tokenizer.apply_chat_template(prompts[2], tokenize=False, add_generation_prompt=True) + answers[2]
    batch = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert scores[2] == pytest.approx(reward_model(**batch).logits[0, 0].item(), abs=1e-5)
    assert abs(scores[2] - scores[0]) > 1e-4
    # What RL used to score, the rollout's own tokens, reads another token than training did on every one of
    # these tokenizers (the end token as padding, or the end token instead of the template's trailing newline).
    with torch.no_grad():
        raw = reward_model(
            input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
        )
    assert abs(raw.logits[0, 0].item() - scores[0]) > 1e-4


def test_a_tokenizer_without_a_pad_token_gets_one_that_never_ends_a_turn(tokenizer_dirs, tmp_path):
    """Mistral's and Llama 3's templates end an answer with eos (`answer</s>`) and bring no pad token. With pad =
    eos the reward model read its score before the end token: a finished answer and one cut at `max_new_tokens`
    scored alike. `<unk>` pads instead (here SmolLM2's `<|endoftext|>`); GPT-2, whose unk is its eos, keeps eos."""
    eos_ended = AutoTokenizer.from_pretrained(tokenizer_dirs["smollm2"])
    eos_ended.pad_token = None
    eos_ended.chat_template = (
        "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
    )
    eos_ended.save_pretrained(tmp_path / "eos-ended")
    scorer = random_llama(tmp_path / "eos-ended", tmp_path / "reward-model", scorer=True)
    tokenizer = load_tokenizer(scorer)
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    model = load_scorer(scorer, CPU, tokenizer.pad_token_id).eval()
    conversation = PROMPTS[0] + [{"role": "assistant", "content": ANSWERS[0]}]
    finished, cut = conversation_scores(model, tokenizer, [conversation, conversation], [True, False])
    assert finished != pytest.approx(cut, abs=1e-6)
    assert load_tokenizer(str(tokenizer_dirs["gpt2"])).pad_token == "<|endoftext|>"


def test_a_base_tokenizer_that_starts_every_text_with_bos_keeps_it_under_the_default_template(tmp_path):
    """Llama 2's base tokenizers bring no chat template and put `<s>` before every text, which their models were
    trained with. Conversations are tokenized without special tokens, so under the default template they lost
    it (GPT-2's, which adds none, keeps the template as it was: tests/data/test_real_assets.py)."""
    llama_like = build_tokenizer()
    llama_like.chat_template = None
    bos = llama_like.bos_token_id
    llama_like.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    llama_like.save_pretrained(tmp_path / "llama-like")
    tokenizer = load_tokenizer(str(tmp_path / "llama-like"))
    conversation = [{"role": "user", "content": "the cat"}]
    ids = prompt_ids(tokenizer, conversation)
    assert ids[0] == bos and ids.count(bos) == 1
    answered = conversation + [{"role": "assistant", "content": "hi"}]
    scored = tokenizer(render(tokenizer, answered), add_special_tokens=False)
    assert scored["input_ids"][0] == bos


def test_end_of_turn_ids_come_from_the_template_eos_and_the_models_generation_config(tokenizer_dirs, tmp_path):
    gpt2, smollm2, chatml = (load_tokenizer(str(tokenizer_dirs[n])) for n in TOKENIZERS)
    assert end_of_turn_ids(gpt2) == [gpt2.eos_token_id] == [50256]
    assert end_of_turn_ids(smollm2) == [smollm2.convert_tokens_to_ids("<|im_end|>")] == [2]
    assert end_of_turn_ids(chatml) == [2, chatml.eos_token_id] == [2, 0]
    policy = load_policy(random_llama(tokenizer_dirs["chatml-eos"], tmp_path / "p"), CPU)
    policy.generation_config.eos_token_id = [0, 7]
    assert end_of_turn_ids(chatml, policy) == [2, 0, 7]


def test_generation_stops_at_the_end_of_turn_when_it_is_not_eos(tokenizer_dirs, tmp_path):
    """A Qwen-style base (eos `<|endoftext|>`, turns end with `<|im_end|>`): answers stop at the end of turn."""
    source = random_llama(tokenizer_dirs["chatml-eos"], tmp_path / "p")
    policy, tokenizer = load_policy(source, CPU).eval(), load_tokenizer(source)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with forced_token(policy, im_end, step=3):
        rollout = sample(policy, tokenizer, PROMPTS * 3, GenerationConfig(max_new_tokens=10), list(range(6)))
    assert rollout.finished.all() and rollout.response_mask.sum(dim=1).tolist() == [4] * 6
    assert (rollout.response_ids[:, 3] == im_end).all()
    assert (rollout.response_ids[:, 4:] == tokenizer.pad_token_id).all()


def test_sampling_ignores_the_models_own_generation_config(tokenizer_dirs, tmp_path):
    """A base model's generation_config.json (repetition penalty, top-k, ...) never changes what is sampled."""
    source = random_llama(tokenizer_dirs["smollm2"], tmp_path / "p")
    tokenizer = load_tokenizer(source)
    plain, tuned = load_policy(source, CPU).eval(), load_policy(source, CPU).eval()
    tuned.generation_config.update(repetition_penalty=50.0, top_k=1, no_repeat_ngram_size=1, min_new_tokens=10)
    config = GenerationConfig(max_new_tokens=10, temperature=1.0)
    expected = sample(plain, tokenizer, PROMPTS * 4, config, list(range(8))).response_ids
    assert torch.equal(sample(tuned, tokenizer, PROMPTS * 4, config, list(range(8))).response_ids, expected)
    assert tuned.generation_config.repetition_penalty == 50.0  # the model keeps its own config


class ScoresSeen(LogitsProcessor):
    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


def test_prompt_seeded_noise_draws_from_the_softmax_of_the_scores():
    """The Gumbel-max trick: the arg-max of scores plus each row's noise is distributed as softmax(scores)."""
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = 4000
    noise = PromptSeededNoise(prompt_seeds(0, "test", range(draws)))
    picked = noise(torch.zeros(draws, 1, dtype=torch.long), probabilities.log().expand(draws, 4)).argmax(dim=-1)
    frequencies = torch.bincount(picked, minlength=4) / draws
    assert frequencies.tolist() == pytest.approx(probabilities.tolist(), abs=0.025)  # about 3 standard errors


def test_a_prompts_sampled_answer_does_not_depend_on_the_prompts_beside_it(tokenizer_dirs, tmp_path):
    """Seeded per prompt: the same prompt and seed give the same answer alone, in a batch of other prompts
    (of other lengths: other padding), and in another order; other seeds give other answers."""
    source = random_llama(tokenizer_dirs["smollm2"], tmp_path / "p")
    policy, tokenizer = load_policy(source, CPU).eval(), load_tokenizer(source)
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=50)
    others = [[{"role": "user", "content": f"Tell me about day {i}, " + "and more " * i}] for i in range(5)]
    alone = sample(policy, tokenizer, PROMPTS[:1], config, [7]).rows()[0][1]
    batch = sample(policy, tokenizer, [*others[:3], PROMPTS[0], *others[3:]], config, [1, 2, 3, 7, 4, 5]).rows()
    assert batch[3][1] == alone
    reordered = sample(policy, tokenizer, [PROMPTS[0], *others[::-1]], config, [7, 5, 4, 3, 2, 1]).rows()
    assert (
        reordered[0][1] == alone
        and [row[1] for row in reordered[1:]] == [row[1] for row in batch[:3] + batch[4:]][::-1]
    )
    assert sample(policy, tokenizer, PROMPTS[:1], config, [8]).rows()[0][1] != alone


@pytest.mark.parametrize("name", TOKENIZERS)
def test_sampled_tokens_are_scored_by_the_distribution_transformers_sampled_from(name, tokenizer_dirs, tmp_path):
    """sampled = scored, checked against transformers itself: the log-probability PPO computes for each
    sampled token equals the one of the scores transformers sampled it from (after its minimum length,
    temperature and top-k processing), for a model that would end its turn at once."""
    source = random_llama(tokenizer_dirs[name], tmp_path / "p")
    policy, tokenizer = load_policy(source, CPU).eval(), load_tokenizer(source)
    end = end_of_turn_ids(tokenizer, policy)[0]
    free = GenerationConfig(max_new_tokens=8, temperature=0.7, top_k=20)
    config = GenerationConfig(max_new_tokens=8, min_new_tokens=5, temperature=0.7, top_k=20)
    seeds = [11, 12, 13, 14]
    with forced_token(policy, end, step=None, bias=8.0):  # the model would end its turn at once
        assert sample(policy, tokenizer, PROMPTS * 2, free, seeds).response_mask.sum(dim=1).tolist() == [1] * 4
        rollout = sample(policy, tokenizer, PROMPTS * 2, config, seeds)
        seen = ScoresSeen()  # the scores as transformers' processors left them, before the prompts' own noise
        processors = sampling_processors(config, seeds)
        processors.insert(-1, seen)
        with own_generation_config(policy):
            output = policy.generate(
                input_ids=rollout.prompt_ids,
                attention_mask=rollout.prompt_mask,
                generation_config=sampling_config(tokenizer, config, list(rollout.end_ids), 8),
                logits_processor=processors,
            )
        with torch.no_grad():
            scored = response_logprobs(policy, rollout, config)[0]
    assert rollout.response_mask.sum(dim=1).tolist() == [6] * 4  # the end of turn as soon as it is allowed
    mask = rollout.response_mask.bool()
    assert torch.equal(output[:, rollout.prompt_ids.shape[1] :][mask], rollout.response_ids[mask])
    sampled_from = torch.stack(seen.scores, dim=1).log_softmax(-1)
    expected = sampled_from.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    assert scored[mask] == pytest.approx(expected[mask], abs=1e-4)


def test_prompts_are_limited_to_leave_room_for_the_answer(tokenizer_dirs):
    tokenizer = load_tokenizer(str(tokenizer_dirs["gpt2"]))
    long_ago = [{"role": "user", "content": "old question " * 20}, {"role": "assistant", "content": "old answer " * 20}]
    conversation = [{"role": "system", "content": "Be brief."}, *long_ago * 3, {"role": "user", "content": "And now?"}]
    ids = fit_prompt(tokenizer, conversation, 40)
    assert len(ids) <= 40
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
        [conversation[0], conversation[-1]], tokenize=False, add_generation_prompt=True
    )
    alone = fit_prompt(tokenizer, [{"role": "user", "content": "word " * 100}], 30)
    assert len(alone) == 30 and tokenizer.decode(alone).endswith("<|endoftext|>\n<|assistant|>\n")
    # RL samples, scores and trains on the conversation the policy saw: the trimmed one, or none
    short = [{"role": "user", "content": "Hi."}]
    assert fitting_prompts(tokenizer, [conversation, [{"role": "user", "content": "word " * 100}], short], 40) == (
        [[conversation[0], conversation[-1]], short],
        1,
    )
    with pytest.raises(InputError, match=r"every prompt is longer than model.max_length less max_new_tokens \(4 "):
        fitting_prompts(tokenizer, [short], 4)


def test_rows_whose_answer_cannot_fit_are_left_out_and_counted(tokenizer_dirs):
    tokenizer = load_tokenizer(str(tokenizer_dirs["gpt2"]))
    short = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}
    long = {"messages": [{"role": "user", "content": "very " * 80}, {"role": "assistant", "content": "Ok."}]}
    assert answerable([short, long, short], tokenizer, 64) == ([short, short], 1)
    pair = {
        "prompt": short["messages"][:1],
        "chosen": short["messages"][1:],
        "rejected": [{"role": "assistant", "content": "No " * 80}],
    }
    assert whole_pairs([pair], tokenizer, 64) == ([], 1)
    # a rated response cut short would be scored at a token in its middle
    rated = {"prompt": pair["prompt"], "response": short["messages"][1:], "ratings": {"helpfulness": [4, 5]}}
    assert whole_rated([rated, rated | {"response": pair["rejected"]}], tokenizer, 64) == ([rated], 1)
    # DPO: the answers are cut, not lost, while the cut leaves them different
    assert distinct_pairs([pair], tokenizer, 64) == ([pair], 0)
    endings = {"chosen": "yes", "rejected": "no"}
    late = {side: [{"role": "assistant", "content": "Fine " * 80 + end}] for side, end in endings.items()}
    assert distinct_pairs([pair | late], tokenizer, 64) == ([], 1)  # they differ only past the cut
    assert distinct_pairs([pair | {"prompt": long["messages"][:1]}], tokenizer, 64) == ([], 1)  # prompt fills it


def test_trained_weights_are_fp32_and_frozen_ones_the_compute_dtype(monkeypatch, tokenizer_dirs, tmp_path):
    """Mixed precision as the HF Trainer's bf16=True does it: on a bf16 card (simulated) trained models keep
    fp32 master weights, frozen ones are bf16; on CPU everything is fp32."""
    source = random_llama(tokenizer_dirs["gpt2"], tmp_path / "p")
    assert load_policy(source, CPU, train=True).dtype == load_policy(source, CPU).dtype == torch.float32
    monkeypatch.setattr("rlhf_pipeline.stages.modeling.loading.compute_dtype", lambda device: torch.bfloat16)
    assert weights_dtype(torch.device("cuda"), train=True) == torch.float32
    assert load_policy(source, CPU, train=True).dtype == torch.float32
    assert load_policy(source, CPU).dtype == torch.bfloat16


def test_a_lora_scorers_trained_head_is_fp32_on_a_bf16_base(monkeypatch, tokenizer_dirs, tmp_path):
    """peft makes its adapters fp32 on a bf16 base but copies the score head it trains (PPO's value head, a
    LoRA reward model's head) in bf16, where AdamW's small updates round away: the head is made fp32 too, and
    runs with or without autocast; folded heads take the base's dtype again."""
    monkeypatch.setattr("rlhf_pipeline.stages.modeling.loading.compute_dtype", lambda device: torch.bfloat16)
    tokenizer = load_tokenizer(str(tokenizer_dirs["gpt2"]))
    source = random_llama(tokenizer_dirs["gpt2"], tmp_path / "rm", scorer=True)
    lora = load_config(None, ["rl.ppo.lora.r=4"]).rl.ppo.lora
    model = with_adapter(load_scorer(source, CPU, tokenizer.pad_token_id), lora, "SEQ_CLS")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert unwrap_adapter(model).model.embed_tokens.weight.dtype == torch.bfloat16
    head = unwrap_adapter(model).score.modules_to_save["default"].weight
    before = head.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    batch = tokenizer(["the cat is kind ."], return_tensors="pt")
    model(**batch).logits.sum().backward()
    optimizer.step()
    assert (head != before).float().mean() > 0.9  # in bf16 the step rounds away for most of the weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(**batch).logits.dtype == torch.bfloat16
    assert model(**batch).logits.dtype == torch.float32
    merged = model.merge_and_unload()
    fold_heads(merged, [1.0])
    assert merged.score.weight.dtype == torch.bfloat16 and merged(**batch).logits.dtype == torch.bfloat16


REAL_TINY = [
    *TINY,
    "model.max_length=48",
    "data.demo.sft_rows=120",
    "data.demo.preference_rows=120",
    "data.demo.prompt_rows=60",
    "sft.max_steps=8",
    "sft.batch_size=8",
    "reward.max_steps=8",
    "reward.batch_size=8",
    "rl.ppo.steps=2",
    "rl.ppo.batch_size=8",
    "rl.ppo.mini_batch_size=4",
    "rl.ppo.ppo_epochs=2",
    "rl.ppo.generation.max_new_tokens=8",
    "rl.ppo.generation.top_k=20",
    "rl.rejection_sampling.rounds=1",
    "rl.rejection_sampling.prompts_per_round=8",
    "rl.rejection_sampling.samples_per_prompt=3",
    "rl.rejection_sampling.generation.max_new_tokens=8",
    "rl.rejection_sampling.training.max_steps=2",
    "evaluate.prompts=8",
    "evaluate.generation.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def pipelines(tokenizer_dirs, tmp_path_factory) -> dict[str, tuple[LocalStore, list[str]]]:
    """prepare, sft and reward once per tokenizer, on a random Llama whose attention has dropout configured."""
    made = {}
    for name in TOKENIZERS:
        root = tmp_path_factory.mktemp(name)
        base = random_llama(tokenizer_dirs[name], root / "base", attention_dropout=0.1)
        store = LocalStore(root / "store")
        overrides = [*REAL_TINY, f"model.base={base}", f"run.store={store.uri}"]
        config = load_config(None, overrides)
        for stage in ("prepare", "sft", "reward"):
            run_stage(stage, config, store)
        made[name] = (store, overrides)
    return made


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("lora", [None, '{"r": 4, "dropout": 0.1}'])
def test_first_ppo_update_sees_the_sampling_policy_ratio_one_and_kl_zero(name, lora, pipelines, tmp_path):
    """Old log-probabilities come from the rollout (eval mode), the update's from train mode: with dropout in
    the model's attention and in LoRA, only disabled dropout makes the first mini-batch's ratio exactly 1.
    Sampled with top-k, scored with the same top-k. The value model trains in train mode."""
    store, overrides = pipelines[name]
    config = load_config(None, overrides + ([f"rl.ppo.lora={lora}"] if lora else []))
    ctx = stage_context("rl", config, store, plan_stage(store, config, "rl"), tmp_path)
    trainer = PPOTrainer(ctx, config.rl.ppo)
    timer = PhaseTimer(CPU)
    modes = []
    value_head = unwrap_adapter(trainer.value_model).score
    value_head.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    rollout, batch, stats = trainer.rollout(0, timer)
    updates = trainer.optimize(0, rollout, batch, timer)
    assert updates["first_ratio_error"] <= 1e-6 and abs(updates["first_approx_kl"]) <= 1e-7
    assert abs(stats["kl"]) <= 1e-6  # the policy is still the reference (top-k restricted alike): KL 0
    assert updates["approx_kl"] > 0  # later mini-batches see a moved policy
    assert modes[0] is False and all(modes[1:])  # value estimates in eval mode, updates in train mode
    assert all(seconds > 0 for seconds in timer.seconds().values())
    assert rollout.input_ids.shape[1] <= config.model.max_length
    assert {p.dtype for p in trainer.trainable_parameters()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in trainer.optimizer.state.values()} == {torch.float32}


def test_minimum_length_keeps_the_first_rollouts_kl_zero_over_the_full_softmax(pipelines, tmp_path):
    """With no top k, only the reference scored without early ends as well makes the KL of the first rollout
    0: the policy's distribution there has no end of turn, a reference's that kept one would differ."""
    store, overrides = pipelines["gpt2"]  # pad == eos: pads after the end must not turn into -inf
    settings = ["rl.ppo.generation.top_k=0", "rl.ppo.generation.min_new_tokens=6"]
    config = load_config(None, overrides + settings)
    ctx = stage_context("rl", config, store, plan_stage(store, config, "rl"), tmp_path)
    trainer = PPOTrainer(ctx, config.rl.ppo)
    timer = PhaseTimer(CPU)
    rollout, batch, stats = trainer.rollout(0, timer)
    assert (rollout.response_mask.sum(dim=1) >= 6).all()
    assert abs(stats["kl"]) <= 1e-6 and torch.isfinite(batch["advantages"]).all()
    updates = trainer.optimize(0, rollout, batch, timer)
    assert updates["first_ratio_error"] <= 1e-6 and updates["policy_loss"] == updates["policy_loss"]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_ppo_rejection_sampling_and_evaluate_run_end_to_end(name, pipelines, tmp_path):
    """Each on the prompts that fit `model.max_length` less its answer's tokens (SmolLM2's templates add a
    system message: a few of the demo's prompts do not fit 48 - 8 tokens), the others counted."""
    store, overrides = pipelines[name]
    for algorithm in ("ppo", "rejection_sampling"):
        config = load_config(None, [*overrides, f"rl.algorithm={algorithm}"])
        rl = run_stage("rl", config, store)[0].metrics
        report = run_stage("evaluate", config, store)[0].metrics
        plan = plan_stage(store, config, "evaluate")
        inputs = stage_context("evaluate", config, store, plan, tmp_path / algorithm).inputs
        tokenizer = load_tokenizer(str(inputs["sft"]))
        for metrics, rows in ((rl, "prompt_train.jsonl"), (report, "prompt_eval.jsonl")):
            prompts = [json.loads(line)["prompt"] for line in (inputs["prepare"] / rows).open()]
            too_long = sum(len(prompt_ids(tokenizer, prompt)) > 48 - 8 for prompt in prompts)
            assert metrics["prompts_too_long"] == too_long and (too_long > 0) == (name != "gpt2")
        if algorithm == "ppo":
            phases = ("generation", "scoring", "reference_values", "optimization")
            assert all(rl[f"{phase}_seconds"] > 0 for phase in phases)
            assert rl["first_ratio_error"] <= 1e-6
        assert set(report["finished_fraction"]) == {"base", "sft", "rl"}
        assert report["kl_rl_sft"] == report["kl_rl_sft"]  # not NaN
    sft = run_stage("sft", config, store)[0].metrics  # cached: its manifest
    assert sft["rows_too_long"] == {"train": 0, "eval": 0}


@pytest.mark.parametrize("name", ("gpt2", "chatml-eos"))
def test_best_of_n_keeps_the_highest_scored_answer(name, pipelines, tmp_path):
    """Each kept answer, scored again through the one scoring path, has the best score of its prompt's N."""
    store, overrides = pipelines[name]
    config = load_config(None, [*overrides, "rl.algorithm=rejection_sampling"])
    ctx = stage_context("rl", config, store, plan_stage(store, config, "rl"), tmp_path)
    prompts = [json.loads(line)["prompt"] for line in (ctx.inputs["prepare"] / "prompt_train.jsonl").open()][:6]
    kept, stats = rejection_sampling.best_of_n(ctx, None, prompts, 0, Processes(rank=0, count=1))
    tokenizer = load_tokenizer(str(ctx.inputs["reward"]))
    reward_model = load_reward_model(str(ctx.inputs["reward"]), CPU, tokenizer.pad_token_id)
    rescored = response_scores(reward_model, tokenizer, prompts, [a.response for a in kept], [a.finished for a in kept])
    assert rescored == pytest.approx([a.score for a in kept], abs=1e-5)
    assert stats["best_score"] > stats["score"]


def test_rejection_sampling_fine_tunes_on_the_tokens_it_sampled(pipelines, monkeypatch, tmp_path):
    """The kept answers train as sampled: the prompt as the policy saw it (no loss), the response through its
    end-of-turn token if it ended its turn, and without one where `max_new_tokens` cut it (through the chat
    template again, every answer would end its turn, teaching the policy to stop mid-sentence)."""
    store, overrides = pipelines["chatml-eos"]  # end of turn <|im_end|> is not eos
    short = ["rl.algorithm=rejection_sampling", "rl.rejection_sampling.generation.max_new_tokens=3"]
    config = load_config(None, [*overrides, *short])
    ctx = stage_context("rl", config, store, plan_stage(store, config, "rl"), tmp_path)
    prompts = [json.loads(line)["prompt"] for line in (ctx.inputs["prepare"] / "prompt_train.jsonl").open()][:8]
    kept, stats = rejection_sampling.best_of_n(ctx, None, prompts, 0, Processes(rank=0, count=1))
    tokenizer = load_tokenizer(str(ctx.inputs["sft"]))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stats["best_finished_fraction"] == sum(a.finished for a in kept) / len(kept) < 1
    for answer in kept:
        assert answer.prompt_ids == prompt_ids(tokenizer, answer.prompt)
        assert (answer.response_ids[-1] == end) == answer.finished
        assert answer.finished or len(answer.response_ids) == 3
    trained = {}
    monkeypatch.setattr(rejection_sampling.SFTTrainer, "train", lambda self: trained.update(rows=self.train_dataset))
    rows = [answer.as_sft_row() for answer in kept]
    rejection_sampling.fine_tune(ctx, None, rows, tmp_path / "round-1", 0, Processes(rank=0, count=1), 1)
    assert [row["labels"] for row in trained["rows"]] == [
        [-100] * len(answer.prompt_ids) + answer.response_ids for answer in kept
    ]
    assert [row["input_ids"] for row in trained["rows"]] == [answer.prompt_ids + answer.response_ids for answer in kept]


def test_gradient_checkpointing_recomputes_the_value_model_too(pipelines, tmp_path):
    """The value model used to stay in eval mode, where activation checkpointing does nothing: now each of its
    layers runs twice per update (forward, and again in the backward pass)."""
    store, overrides = pipelines["gpt2"]
    calls = {}
    for checkpointing in (False, True):
        config = load_config(None, [*overrides, f"rl.ppo.gradient_checkpointing={str(checkpointing).lower()}"])
        ctx = stage_context("rl", config, store, plan_stage(store, config, "rl"), tmp_path / str(checkpointing))
        trainer = PPOTrainer(ctx, config.rl.ppo)
        timer = PhaseTimer(CPU)
        rollout, batch, _ = trainer.rollout(0, timer)
        # Inside the layer's forward (the checkpointed part), so the hook sees the recomputation too.
        mlp = unwrap_adapter(trainer.value_model).model.layers[0].mlp
        calls[checkpointing] = 0

        def counted(module, args, checkpointing=checkpointing):
            calls[checkpointing] += 1

        mlp.register_forward_pre_hook(counted)
        trainer.optimize(0, rollout, batch, timer)
    updates = config.rl.ppo.ppo_epochs * config.rl.ppo.batch_size // config.rl.ppo.mini_batch_size
    assert calls == {False: updates, True: 2 * updates}


def test_grpo_stops_and_scores_at_the_end_of_turn_through_trl(pipelines, monkeypatch, tmp_path):
    """TRL's GRPOTrainer gets every end-of-turn id (through the model's generation config) and hands the reward
    function the completion ids, from which it tells finished answers from cut ones."""
    from rlhf_pipeline.stages.rlhf import grpo_rloo

    store, overrides = pipelines["chatml-eos"]
    seen = []
    scores = grpo_rloo.response_scores
    monkeypatch.setattr(grpo_rloo, "response_scores", lambda *a: seen.append(a[-1]) or scores(*a))
    settings = ["rl.grpo.max_steps=2", "rl.grpo.batch_size=8", "rl.grpo.num_generations=4"]
    config = load_config(None, [*overrides, *settings, "rl.grpo.generation.max_new_tokens=8", "rl.algorithm=grpo"])
    rl = run_stage("rl", config, store)[0].metrics
    # SmolLM2's template adds its own system message: a few single-turn prompts do not fit 48 - 8 tokens.
    ctx_inputs = stage_context("rl", config, store, plan_stage(store, config, "rl"), tmp_path).inputs
    tokenizer = load_tokenizer(str(ctx_inputs["sft"]))
    rows = [json.loads(line)["prompt"] for line in (ctx_inputs["prepare"] / "prompt_train.jsonl").open()]
    too_long = sum(len(prompt_ids(tokenizer, prompt)) > 40 for prompt in rows)
    assert rl["steps"] == 2 and rl["prompts_too_long"] == too_long > 0
    assert len(seen) == 2 and all(len(flags) == 8 for flags in seen)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_saved_policy_stops_at_the_end_of_its_turn_in_transformers_generate(name, pipelines, tmp_path):
    """The SFT model as a user loads it (`from_pretrained`, `generate`, the model card's example): its answer
    ends at the end-of-turn token. The base's generation config stopped only at its eos: a Qwen-style base
    (`chatml-eos`) wrote on past `<|im_end|>` into an invented next turn."""
    store, overrides = pipelines[name]
    config = load_config(None, overrides)
    sft_dir = stage_context("reward", config, store, plan_stage(store, config, "reward"), tmp_path).inputs["sft"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(sft_dir).eval(), AutoTokenizer.from_pretrained(sft_dir)
    end = end_of_turn_ids(tokenizer)[0]  # the template's: <|im_end|>, or GPT-2's eos
    prompt = tokenizer.apply_chat_template(
        PROMPTS[0], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    torch.manual_seed(0)
    with forced_token(model, end, step=2):  # no end before it (min_new_tokens: every id of the saved config)
        answer = model.generate(**prompt, do_sample=True, min_new_tokens=2, max_new_tokens=10)
    assert answer[0, prompt["input_ids"].shape[1] :].tolist()[2:] == [end]


def test_a_saved_tokenizer_does_not_depend_on_hub_access(tokenizer_dirs, tmp_path, monkeypatch):
    """transformers writes whether the Hub was reachable (HF_HUB_OFFLINE) into tokenizer_config.json: the same
    training run on a machine with network and one without would publish different bytes, and every cache key
    downstream of them would differ."""
    saved = []
    for offline in (False, True):
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", offline)
        load_tokenizer(str(tokenizer_dirs["smollm2"])).save_pretrained(tmp_path / str(offline))
        saved.append((tmp_path / str(offline) / "tokenizer_config.json").read_bytes())
    assert saved[0] == saved[1] and b"local_files_only" not in saved[0]
