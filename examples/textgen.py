"""A generated topic-classification text set (sports, weather, technology, food).

Sentences are drawn from templates filled with topic words, or are topic words shuffled
among common words (so position and filler carry no topic); some hold a distracting word
from another topic, so the task is learnable but not trivial (a sentence with one topic
word and one distractor is ambiguous). Deterministic for a given seed; no downloads.
"""

from __future__ import annotations

import random

__all__ = ["TOPICS", "generate"]

TOPICS: dict[str, list[str]] = {
    "sports": ["match", "goal", "team", "coach", "league", "stadium", "referee", "score", "tournament",
               "striker", "season", "championship", "tennis", "football", "basketball", "marathon", "players",
               "penalty", "victory", "defeat", "medal", "athlete", "training", "fans", "playoffs"],
    "weather": ["rain", "storm", "sunny", "forecast", "cloudy", "snow", "temperature", "wind", "humidity",
                "thunder", "drizzle", "fog", "heatwave", "frost", "hurricane", "umbrella", "showers",
                "breeze", "degrees", "lightning", "hail", "flood", "drought", "sky", "climate"],
    "technology": ["software", "computer", "server", "network", "laptop", "processor", "update", "app",
                   "database", "cloud", "algorithm", "smartphone", "internet", "chip", "code", "robot",
                   "battery", "screen", "keyboard", "startup", "encryption", "browser", "download", "data",
                   "gadget"],
    "food": ["pizza", "recipe", "bread", "cheese", "restaurant", "soup", "chef", "dinner", "salad", "pasta",
             "dessert", "kitchen", "flavor", "spicy", "breakfast", "chocolate", "noodles", "oven", "sauce",
             "menu", "vegetables", "cake", "coffee", "lunch", "bakery"],
}

_TEMPLATES = [
    "i heard about the {a} and the {b} today",
    "the {a} was all anyone talked about this morning",
    "have you seen the news about the {a} {b}",
    "my friend told me the {a} would be better than the {b}",
    "yesterday the {a} surprised everyone",
    "we spent the whole afternoon on the {a} and {b}",
    "nobody expected such a {a} after the {b}",
    "what do you think about this {a}",
    "the report mentions the {a}, the {b} and more",
    "it is hard to ignore the {a} these days",
    "there was a long discussion about {a} at work",
    "honestly the {a} made my week",
]

_FILLER = ["day", "news", "plan", "story", "weekend", "idea"]
# common words for free-form sentences: they carry no topic
_COMMON = ["the", "a", "and", "with", "today", "tomorrow", "tonight", "late", "early", "new", "old", "great", "bad",
           "final", "big", "small", "we", "they", "my", "our", "had", "got", "made", "saw", "was", "is", "will",
           "be", "very", "really", "for", "in", "at", "after", "before", "again", "expected", "needs", "better"]


def generate(n: int, seed: int = 0) -> tuple[list[str], list[int], list[str]]:
    """``n`` sentences, their topic ids, and the topic names (in id order)."""
    rng = random.Random(seed)
    names = list(TOPICS)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(len(names))
        words = rng.sample(TOPICS[names[label]], rng.choice((1, 2, 3)))
        if rng.random() < 0.4:
            other = rng.choice([t for i, t in enumerate(names) if i != label])
            words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS[other]))
        template = rng.choice(_TEMPLATES)
        if rng.random() < 0.3:  # free-form: topic words among common words, in any order
            tokens = words + rng.sample(_COMMON, rng.randint(1, 6))
            rng.shuffle(tokens)
            text = " ".join(tokens)
        elif "{b}" in template:
            text = template.format(a=words[0], b=" ".join(words[1:]) or rng.choice(_FILLER))
        else:
            text = template.format(a=words[0]) + (f" with {' and '.join(words[1:])}" if len(words) > 1 else "")
        texts.append(text)
        labels.append(label)
    return texts, labels, names
