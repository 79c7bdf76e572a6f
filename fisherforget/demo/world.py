"""The two built-in worlds of ``fisherforget demo``: generated facts, splits and a word tokenizer.

Every sample is ``<bos> e<k> <relation> = v<j> <eos>`` with the loss on ``v<j> <eos>``.

**conflict** (negative transfer through conflicting facts). ``E`` entities, three random tables
entity -> value: ``R1`` and ``R2`` are kept knowledge; ``R3`` is pre-trained with values that
differ from ``R1`` for every entity. The learning task redefines ``R3``: ``e R3 =`` must answer
``R1(e)``; it trains on 2/5 of the entities and is scored on validation (2/15) and test (1/5)
entities it never trains on, so solving them needs the rule ``R3 := R1``. The forgetting task's
prompts are ``e R1/R2/R3 =`` for the remaining 4/15 (``D_self`` entities): the model's answers
there are ``D_self``, of which only the ``R3`` third conflicts with the learning task.

**rule** (the paper's mechanism: forgetting unrelated knowledge to restore plasticity). ``E``
entities, ``V`` values; kept relations ``K0``, ``K1`` (random tables); six forgetting rules
``F_i(e) = pi_i(K1(e))`` (random permutations ``pi_i``); two learning rules
``L_j(e) = sigma_j(K0(e))`` trained on half the entities and scored on unseen ones. The model
pre-trained with the ``F`` rules learns them by memorising rather than composing, and then
learns the ``L`` rules worse than a model pre-trained without them (the negative transfer).
``D_self`` is the model's answers to ``K`` and ``F`` prompts of the ``D_self`` entities; the ``F``
answers are the ones to forget.

Both worlds are fixed by their seed (the reported seeds vary the model, not the world).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

SPECIALS = ("<pad>", "<bos>", "<eos>", "=")
IGNORE = -100

Facts = tuple[torch.Tensor, torch.Tensor]


@dataclass
class World:
    """Relation tables over entities, the entity splits and the role of each relation.

    ``tables[rel][e]`` is the value of relation ``rel`` for entity ``e``. The learning task asks
    ``learn_relations`` and answers from ``learn_tables``; ``forget_relations`` are the ones to
    forget; ``kept_relations`` are kept knowledge. ``pretrain_relations`` (with conflict) and
    ``clean_relations`` (without) are what the two pre-trained models saw.
    """

    name: str
    n_entities: int
    n_values: int
    tables: dict[str, list[int]]
    learn_relations: list[str]
    learn_tables: dict[str, str]
    forget_relations: list[str]
    kept_relations: list[str]
    self_relations: list[str]  # the prompts that make up D_self
    learn_train: list[int]
    self_entities: list[int]
    learn_val: list[int]
    learn_test: list[int]
    words: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ids = {w: i for i, w in enumerate(self.words)}

    @property
    def pretrain_relations(self) -> list[str]:
        return self.kept_relations + self.forget_relations

    @property
    def clean_relations(self) -> list[str]:
        return list(self.kept_relations)

    @property
    def outside_self(self) -> list[int]:
        inside = set(self.self_entities)
        return [e for e in range(self.n_entities) if e not in inside]

    def prompt(self, entity: int, relation: str) -> str:
        return f"e{entity} {relation} ="

    def facts(self, relation: str, entities: Sequence[int], table: str | None = None) -> Facts:
        """``<bos> e R = v <eos>`` per entity, ``v`` from ``table`` (default: the relation's own
        table); labels cover ``v <eos>``."""
        ids = self.ids
        values = self.tables[table or relation]
        rows = [[ids["<bos>"], ids[f"e{e}"], ids[relation], ids["="], ids[f"v{values[e]}"],
                 ids["<eos>"]] for e in entities]
        x = torch.tensor(rows, dtype=torch.long).reshape(-1, 6)
        y = x.clone()
        y[:, :4] = IGNORE
        return x, y

    def many(self, relations: Sequence[str], entities: Sequence[int],
             tables: dict[str, str] | None = None) -> Facts:
        parts = [self.facts(r, entities, (tables or {}).get(r)) for r in relations]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def learn_data(self, entities: Sequence[int]) -> Facts:
        return self.many(self.learn_relations, entities, self.learn_tables)

    def forget_data(self, entities: Sequence[int]) -> Facts:
        return self.many(self.forget_relations, entities)

    def kept_data(self, entities: Sequence[int]) -> Facts:
        return self.many(self.kept_relations, entities)

    def relation_of(self, input_ids: torch.Tensor) -> str:
        return self.words[int(input_ids[2])]


def _split(n: int, fractions: Sequence[float], rng: random.Random) -> list[list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    sizes = [int(round(f * n)) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    out, start = [], 0
    for size in sizes:
        out.append(sorted(order[start:start + size]))
        start += size
    return out


def _words(relations: Sequence[str], n_values: int, n_entities: int) -> list[str]:
    return (list(SPECIALS) + list(relations) + [f"v{i}" for i in range(n_values)]
            + [f"e{i}" for i in range(n_entities)])


def conflict_world(n_entities: int = 480, n_values: int = 16, seed: int = 0) -> World:
    """The conflict world (module doc): splits 2/5 train, 4/15 ``D_self``, 2/15 val, 1/5 test."""
    if n_entities < 15:
        raise ValueError(f"conflict_world: n_entities must be >= 15, got {n_entities}")
    rng = random.Random(seed)
    r1 = [rng.randrange(n_values) for _ in range(n_entities)]
    r2 = [rng.randrange(n_values) for _ in range(n_entities)]
    r3 = [(a + 1 + rng.randrange(n_values - 1)) % n_values for a in r1]  # never equal to R1
    train, selfs, val, test = _split(n_entities, (2 / 5, 4 / 15, 2 / 15, 1 / 5), rng)
    relations = ["R1", "R2", "R3"]
    return World("conflict", n_entities, n_values, {"R1": r1, "R2": r2, "R3": r3},
                 learn_relations=["R3"], learn_tables={"R3": "R1"}, forget_relations=["R3"],
                 kept_relations=["R1", "R2"], self_relations=relations, learn_train=train,
                 self_entities=selfs, learn_val=val, learn_test=test,
                 words=_words(relations, n_values, n_entities))


def rule_world(n_entities: int = 256, n_values: int = 32, n_forget: int = 6, n_learn: int = 2,
               seed: int = 0) -> World:
    """The rule world (module doc): 1/2 train, 3/16 ``D_self`` entities (which may also be
    trained on: they are disjoint from val and test), 1/8 val, 3/8 test."""
    if n_entities < 16:
        raise ValueError(f"rule_world: n_entities must be >= 16, got {n_entities}")
    rng = random.Random(seed)
    tables: dict[str, list[int]] = {
        "K0": [rng.randrange(n_values) for _ in range(n_entities)],
        "K1": [rng.randrange(n_values) for _ in range(n_entities)],
    }

    def permutation() -> list[int]:
        values = list(range(n_values))
        rng.shuffle(values)
        return values

    forget = [f"F{i}" for i in range(n_forget)]
    learn = [f"L{j}" for j in range(n_learn)]
    for rel in forget:
        pi = permutation()
        tables[rel] = [pi[v] for v in tables["K1"]]
    for rel in learn:
        sigma = permutation()
        tables[rel] = [sigma[v] for v in tables["K0"]]
    train, rest = _split(n_entities, (1 / 2, 1 / 2), rng)
    rest_rng = list(rest)
    rng.shuffle(rest_rng)
    n_val = n_entities // 8
    val, test = sorted(rest_rng[:n_val]), sorted(rest_rng[n_val:])
    # D_self entities come from the training half: they never overlap val or test.
    selfs = sorted(rng.sample(train, (3 * n_entities) // 16))
    relations = ["K0", "K1"] + forget + learn
    return World("rule", n_entities, n_values, tables, learn_relations=learn,
                 learn_tables={r: r for r in learn}, forget_relations=forget,
                 kept_relations=["K0", "K1"], self_relations=["K0", "K1"] + forget,
                 learn_train=train, self_entities=selfs, learn_val=val, learn_test=test,
                 words=_words(relations, n_values, n_entities))


def word_tokenizer(words: Sequence[str]):
    """A ``transformers`` fast tokenizer over whitespace-separated ``words`` (BOS prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")
