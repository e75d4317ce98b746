"""A generated topic-classification text set (sports, weather, technology, food).

Sentences are drawn from templates filled with topic words, or are topic words shuffled
among common words (so position and filler carry no topic); some hold a distracting word
from another topic, so the task is learnable but not trivial (a sentence with one topic
word and one distractor is ambiguous). Deterministic for a given seed; no downloads.

``SPANISH`` holds the same topics' words in Spanish: ``generate(n, topics=SPANISH)`` is the
same task with the topic words in another language among the English sentences, a shift an
English encoder (all-MiniLM-L6-v2) handles badly zero-shot and learns from a few hundred
labelled texts (``examples.minilm_embedding.retrain``).
"""

from __future__ import annotations

import random

__all__ = ["TOPICS", "SPANISH", "generate"]

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

# the same words in Spanish (accents dropped, as typed on many keyboards), topic by topic
SPANISH: dict[str, list[str]] = {
    "sports": ["partido", "gol", "equipo", "entrenador", "liga", "estadio", "arbitro", "marcador", "torneo",
               "delantero", "temporada", "campeonato", "tenis", "futbol", "baloncesto", "maraton", "jugadores",
               "penalti", "victoria", "derrota", "medalla", "atleta", "entrenamiento", "aficionados",
               "eliminatorias"],
    "weather": ["lluvia", "tormenta", "soleado", "pronostico", "nublado", "nieve", "temperatura", "viento",
                "humedad", "trueno", "llovizna", "niebla", "ola de calor", "helada", "huracan", "paraguas",
                "chubascos", "brisa", "grados", "relampago", "granizo", "inundacion", "sequia", "cielo", "clima"],
    "technology": ["programa", "computadora", "servidor", "red", "portatil", "procesador", "actualizacion",
                   "aplicacion", "base de datos", "nube", "algoritmo", "telefono movil", "internet", "chip",
                   "codigo", "robot", "bateria", "pantalla", "teclado", "empresa emergente", "cifrado",
                   "navegador", "descarga", "datos", "aparato"],
    "food": ["pizza", "receta", "pan", "queso", "restaurante", "sopa", "cocinero", "cena", "ensalada", "pasta",
             "postre", "cocina", "sabor", "picante", "desayuno", "chocolate", "fideos", "horno", "salsa", "menu",
             "verduras", "pastel", "cafe", "almuerzo", "panaderia"],
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


def generate(n: int, seed: int = 0,
             topics: dict[str, list[str]] | None = None) -> tuple[list[str], list[int], list[str]]:
    """``n`` sentences, their topic ids, and the topic names (in id order); ``topics``: the
    topic words (default :data:`TOPICS`)."""
    rng = random.Random(seed)
    topics = TOPICS if topics is None else topics
    names = list(topics)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(len(names))
        words = rng.sample(topics[names[label]], rng.choice((1, 2, 3)))
        if rng.random() < 0.4:
            other = rng.choice([t for i, t in enumerate(names) if i != label])
            words.insert(rng.randrange(len(words) + 1), rng.choice(topics[other]))
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
