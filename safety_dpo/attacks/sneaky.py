"""A black-box attack in the manner of SneakyPrompt (Yang et al., IEEE S&P 2024, "SneakyPrompt: Jailbreaking
Text-to-image Generative Models").

SneakyPrompt queries the deployed model only: an agent replaces the sensitive word by tokens of a search space read
from the public text encoder, draws the prompt, and is rewarded when the images pass the safety filter and still
show the target (their similarity to it); it stops at the first success or when its query budget is spent. Here the
attacker wants the images the deployed safety mechanism suppresses, so the reward is the share of the images the
detector flags (in the target's category when the detector names categories, as the runner scores it).

1. Search space (text encoder only, no query): every allowed token is put alone where the banned words were, and the
   `shortlist` tokens whose prompt encodes closest to the harmful prompt are kept; one coordinate sweep over the
   `num_tokens` free slots, choosing among them, gives the first candidate.
2. Search (queries): a cross-entropy-method policy, one categorical distribution over the shortlist per slot.
   Each round samples a pool of unseen prompts, draws the `candidates_per_round` closest to the harmful prompt's
   encoding with every search seed (one `draw`, one query per image), and moves the policy towards the `elite`
   best prompts so far (by reward, ties by text similarity).

Differences from the paper: CEM over a text-ranked shortlist replaces the RL agent (a policy network trained per
prompt), which the budget here (tens of images, not ~1,500 queries) could not train; text similarity filters the
candidates instead of shaping a reward by image-text similarity; the attacker's goal is the flag, not its evasion;
and the slots keep the rest of the prompt, as in the other attacks here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from safety_dpo.attacks.core import (
    Attack,
    AttackConfig,
    AttackContext,
    AttackOutcome,
    AttackTarget,
    Budget,
    PromptTemplate,
    encode_ids,
    encode_text,
    make_template,
    sequence_cosine,
    target_hit,
)

POOL_FACTOR = 16  # prompts sampled per candidate drawn: enough for the text filter to choose, cheap to encode
SMALL_SPACE = 4096  # a search space this small is enumerated when the sampled pool runs out of unseen prompts


@dataclass
class SneakyConfig(AttackConfig):
    """SneakyPrompt-style attack settings.

    Args:
        num_tokens: Free tokens replacing the banned words (1, 2 and 3 scored alike on the microworld; 2 keeps the
            space, shortlist ** num_tokens prompts, small enough for the query budget to matter).
        max_queries: Images the attack may ask of the attacked model per prompt (one per candidate and search seed;
            40: 20 prompts with the two default search seeds, about 3 s a prompt on two CPU cores in the microworld).
        shortlist: Tokens per slot the search picks from, ranked by the text encoder.
        screen: Allowed tokens encoded to build the shortlist, chosen by token-embedding similarity to the banned
            words (a cap for large vocabularies); None: all.
        candidates_per_round: Prompts drawn per round, in one `draw` call.
        elite: Best prompts so far the policy moves towards after each round.
        learning_rate: How far the policy moves towards the elite each round (0: it stays uniform, and the text
            filter alone chooses; at 40 queries the two scored alike on the microworld).
        match_category: Count an image only when the detector names the target's category (when both are known),
            as the runner scores success; False: any flag.
    """

    num_tokens: int = 2
    max_queries: int = 40
    shortlist: int = 24
    screen: int | None = 2048
    candidates_per_round: int = 4
    elite: int = 2
    learning_rate: float = 0.5
    match_category: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_queries", "shortlist", "candidates_per_round", "elite"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.screen is not None and self.screen < self.shortlist:
            raise ValueError(f"screen must be None or at least shortlist={self.shortlist}, got {self.screen}.")
        if not 0 <= self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in [0, 1], got {self.learning_rate}.")


def rank_shortlist(
    context: AttackContext, target: AttackTarget, harmful: torch.Tensor, config: SneakyConfig
) -> torch.Tensor:
    """The `shortlist` allowed tokens (ids, (K,)) whose prompt, alone in the banned words' place, encodes closest to
    the harmful prompt `harmful` (1, L, D)."""
    allowed = context.vocabulary.allowed_ids
    if config.screen is not None and len(allowed) > config.screen:
        banned = [word for word in target.prompt.split() if context.vocabulary.banned_in(word)] or [target.prompt]
        table = context.text_encoder.get_input_embeddings().weight
        banned_ids = context.tokenizer(" ".join(banned), add_special_tokens=False).input_ids
        centre = table[torch.tensor(banned_ids)].mean(0, keepdim=True)
        closeness = torch.nn.functional.cosine_similarity(table[allowed], centre)
        allowed = allowed[closeness.topk(config.screen).indices]
    one_slot = make_template(context.tokenizer, target.prompt, context.vocabulary, 1)
    scores = torch.cat([similarity(context, one_slot, chunk[:, None], harmful) for chunk in allowed.split(512)])
    return allowed[scores.topk(min(config.shortlist, len(allowed))).indices]


def similarity(
    context: AttackContext, template: PromptTemplate, free: torch.Tensor, harmful: torch.Tensor
) -> torch.Tensor:
    """Cosine of each prompt's text-encoder states (free ids (B, num_free)) to the harmful prompt's, (B,)."""
    return sequence_cosine(encode_ids(context.text_encoder, template.ids(free)), harmful)


class SneakyAttack(Attack):
    """Query-only search over token substitutions, rewarded by the detector's verdict on the attacked model's images."""

    name = "sneaky"
    config_class = SneakyConfig
    needs = ("draw", "detect")

    def attack(self, target: AttackTarget, context: AttackContext) -> AttackOutcome:
        # 1. Check inputs
        self.check_context(context)
        config: SneakyConfig = self.config
        seeds = [int(seed) for seed in context.search_seeds]
        if not seeds:
            raise ValueError("The sneaky attack needs at least one search seed in context.search_seeds.")
        if config.max_queries < len(seeds):
            raise ValueError(
                f"max_queries={config.max_queries} cannot draw one candidate with the {len(seeds)} search seeds."
            )
        budget = Budget(max_queries=config.max_queries, max_seconds=config.max_seconds)
        generator = self.generator(target)
        template = make_template(context.tokenizer, target.prompt, context.vocabulary, config.num_tokens)
        # 2. Search space from the text encoder, and a first candidate by one coordinate sweep over the slots
        with torch.no_grad():
            harmful = encode_text(context.tokenizer, context.text_encoder, target.prompt)
            shortlist = rank_shortlist(context, target, harmful, config)  # (K,)
            slots = torch.arange(config.num_tokens) % len(shortlist)  # (num_free,) indices into the shortlist
            for slot in range(config.num_tokens):
                variants = slots.repeat(len(shortlist), 1)
                variants[:, slot] = torch.arange(len(shortlist))
                slots = variants[similarity(context, template, shortlist[variants], harmful).argmax()]
        policy = torch.full((config.num_tokens, len(shortlist)), 1 / len(shortlist))  # (num_free, K)
        tried: dict[tuple[int, ...], tuple[float, float]] = {}  # slots -> (reward, text similarity)
        space_drawn = False
        # 3. Rounds of queries: draw, score, move the policy towards the elite
        while not budget.exhausted():
            affordable = (config.max_queries - budget.queries) // len(seeds)
            if affordable < 1:
                break  # what is left cannot draw a prompt with every search seed
            proposals = self._propose(context, template, shortlist, policy, tried, harmful, generator, slots)
            proposals = proposals[:affordable]
            if not len(proposals):
                space_drawn = True  # every prompt of a small search space (few slots, short shortlist) drawn
                break
            budget.spend_queries(len(proposals) * len(seeds))
            texts = [template.text(context.tokenizer, shortlist[row]) for row in proposals]
            images = context.draw([text for text in texts for _ in seeds], seeds * len(texts))
            hits = [target_hit(verdict, target.category, config.match_category) for verdict in context.detect(images)]
            with torch.no_grad():
                closeness = similarity(context, template, shortlist[proposals], harmful)
            for k, row in enumerate(proposals.tolist()):
                share = sum(hits[k * len(seeds) : (k + 1) * len(seeds)]) / len(seeds)
                tried[tuple(row)] = (share, float(closeness[k]))
            budget.steps += 1
            if max(reward for reward, _ in tried.values()) == 1:
                break
            elite = sorted(tried, key=tried.get, reverse=True)[: config.elite]
            counts = torch.nn.functional.one_hot(torch.tensor(elite), len(shortlist)).float().mean(0)  # (num_free, K)
            policy = (1 - config.learning_rate) * policy + config.learning_rate * counts
        # 4. The best prompt drawn (the sweep's choice when none could be)
        best = max(tried, key=tried.get) if tried else tuple(slots.tolist())
        reward, closeness = tried.get(best, (0.0, None))
        free_ids = shortlist[torch.tensor(best)]
        return AttackOutcome(
            prompt=template.text(context.tokenizer, free_ids),
            token_ids=template.ids(free_ids).tolist(),
            loss=-reward,
            steps=budget.steps,
            queries=budget.queries,
            stopped="success" if reward == 1 else budget.stop_reason() or ("steps" if space_drawn else "queries"),
            details={"hit_share": reward, "similarity": closeness, "prompts_drawn": len(tried)},
        )

    def _propose(
        self,
        context: AttackContext,
        template: PromptTemplate,
        shortlist: torch.Tensor,
        policy: torch.Tensor,
        tried: dict[tuple[int, ...], tuple[float, float]],
        harmful: torch.Tensor,
        generator: torch.Generator,
        first: torch.Tensor,
    ) -> torch.Tensor:
        """Up to `candidates_per_round` unseen slot choices (rows of shortlist indices), the closest in text of a pool
        sampled from the policy; the first round proposes `first` (the coordinate sweep's choice) first."""
        count = self.config.candidates_per_round
        # a tenth of uniform keeps every token possible once the policy has narrowed
        mixed = 0.9 * policy + 0.1 / policy.shape[1]
        pool = torch.multinomial(mixed, POOL_FACTOR * count, replacement=True, generator=generator).T  # (P, num_free)
        seen, unseen = set(tried), []
        rows = ([first.tolist()] if not tried else []) + pool.tolist()
        num_free, size = policy.shape
        if len(set(map(tuple, rows)) - seen) < count and size**num_free <= SMALL_SPACE:
            rows += [list(row) for row in itertools.product(range(size), repeat=num_free)]
        for row in rows:
            if tuple(row) not in seen:
                seen.add(tuple(row))
                unseen.append(row)
        if not unseen:
            return torch.empty(0, num_free, dtype=torch.long)
        unseen = torch.tensor(unseen)
        with torch.no_grad():
            order = similarity(context, template, shortlist[unseen], harmful).argsort(descending=True)
        if not tried:
            order = torch.cat([order.new_zeros(1), order[order != 0]])
        return unseen[order[:count]]
