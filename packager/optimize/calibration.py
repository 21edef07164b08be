"""Calibration text for static int8: a few hundred varied texts generated in code (nothing downloaded).

Deterministic (fixed seed), disjoint from packager.validate.VALIDATION_TEXTS (the gate's data), and free of
anything that tokenizes like a validation text (no empty or whitespace-only string). It covers what validation and
served traffic contain: short and long prose, questions, imperatives, chat with emoji, numbers, dates, units, code,
shell, URLs, e-mail addresses, text in 14 other languages, one-word and punctuation-only texts, and documents longer
than 256 tokens (so the truncated, full-length case is calibrated).
"""

from __future__ import annotations

import random

from packager.validate import VALIDATION_TEXTS, Example

SUBJECTS = ["The engineer", "A small child", "My neighbour", "The committee", "Our server", "The old dog", "A tourist",
            "The pilot", "This library", "The orchestra", "A nurse", "The startup", "Her grandmother", "The robot",
            "Every student", "The weather service", "A delivery van", "The council", "The cat", "An astronaut"]
VERBS = ["repaired", "painted", "ignored", "described", "downloaded", "cooked", "cancelled", "measured", "sold",
         "photographed", "translated", "rewrote", "celebrated", "tested", "forgot", "announced", "visited", "cleaned"]
OBJECTS = ["the broken bicycle", "a long letter to the editor", "the quarterly budget", "three loaves of bread",
           "the database migration", "an ancient map of the harbour", "the kitchen floor", "a new vaccine schedule",
           "the football match", "the firmware on every router", "a surprise party", "the train timetable",
           "the missing invoice", "a mountain cabin", "the neural network", "the garden fence", "a jazz record"]
TAILS = ["before sunrise", "after the storm", "without telling anyone", "on Tuesday afternoon", "in under an hour",
         "for the second time this year", "despite the noise", "with great care", "at the last minute", "",
         "while everyone was asleep", "because the deadline moved", "in front of the museum"]
QUESTIONS = ["How do I reset my password?", "Where can I buy tickets for the concert tonight?",
             "What is the capital of Australia?", "Why does the build fail on Windows only?",
             "Is it going to rain tomorrow in Lisbon?", "Can you recommend a good book about history?",
             "How long does it take to boil an egg?", "Which GPU should I use for inference?",
             "When was the bridge first opened to traffic?", "Who wrote the theme music for that film?",
             "Does this medicine interact with alcohol?", "What time does the pharmacy close on Sundays?"]
IMPERATIVES = ["Turn off the lights when you leave.", "Send the slides to the whole team by noon.",
               "Restart the service and check the logs.", "Add two cups of flour and stir gently.",
               "Please call me back as soon as possible.", "Do not feed the animals.",
               "Click the blue button to continue.", "Merge the pull request after the review."]
CHAT = ["lol that was amazing 😂😂", "brb 5 min", "thx!!", "omg yes 🙌", "can't wait 🎂🎈", "nope.", "sure, why not",
        "ugh mondays 😩", "see u at 7?", "👍", "gg wp", "hmm... not sure about that 🤔", "Happy birthday!!! 🥳🎁",
        "meeting moved to 3pm ⏰", "ok cool", "yes", "no", "hi", "Thanks.", "?", "...", "!!!", "A", "42"]
TECH = [
    'pip install --upgrade numpy==2.1.3',
    'SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;',
    'for i in range(10): print(i ** 2)',
    'git rebase -i HEAD~3 && git push --force-with-lease',
    'docker run --rm -p 8000:8000 tritonserver:24.10-py3',
    'const x = arr.map(v => v * 2).filter(Boolean);',
    'ERROR 2026-03-14T09:26:53Z worker-3 OOMKilled (exit code 137)',
    'https://example.org/docs/v2/index.html?q=tensor',
    'contact: jane.doe@example.com, +44 20 7946 0958',
    'Version 3.11.4 fixes CVE-2024-12345 and bumps OpenSSL to 3.0.13',
    'The invoice total is $1,299.99 (VAT 20% included), due 15/07/2027.',
    'Temperature: -3.5 °C, humidity 87 %, wind 24 km/h NW',
    'std::vector<int> v{1, 2, 3}; v.push_back(4);',
    'kubectl get pods -n prod | grep CrashLoopBackOff',
    'Matrix A is 384×1536; B is 1536×384; C = A·B has 147,456 entries.',
    'ISBN 978-3-16-148410-0, pp. 233–241',
]
FOREIGN = ["Le chat dort sur le canapé depuis ce matin.", "Nous partirons en vacances à la montagne en août.",
           "Ich habe meinen Regenschirm im Büro vergessen.", "Die Besprechung wurde auf nächste Woche verschoben.",
           "¿Dónde está la biblioteca más cercana?", "Mañana vamos a cocinar paella con mis abuelos.",
           "La pizza napoletana è patrimonio dell'UNESCO.", "O ônibus chegou atrasado por causa da chuva.",
           "Я люблю читать книги по вечерам.", "Москва — крупнейший город России.", "Завтра будет солнечно и тепло.",
           "明日は雨が降るかもしれません。", "この本はとても面白かったです。", "駅までの道を教えてください。",
           "我今天早上喝了一杯咖啡。", "北京是中国的首都。", "这个问题很难回答。", "오늘 날씨가 정말 좋네요.",
           "القطار يغادر في الساعة الثامنة.", "Η θάλασσα είναι ήρεμη σήμερα.", "Dziękuję bardzo za pomoc!",
           "Bugün hava çok güzel.", "Tôi thích ăn phở vào buổi sáng.", "मैं कल दिल्ली जा रहा हूँ।"]
PARAGRAPH_SEEDS = ["The history of the city begins with a small fishing village on the river.",
                   "Over the following centuries merchants built warehouses along the quay.",
                   "Modern inference servers batch requests to use the hardware efficiently.",
                   "Quantization replaces floating point arithmetic with small integers.",
                   "The committee published its findings after two years of consultation.",
                   "Researchers measured the temperature of the lake every morning.",
                   "Most users never read the terms and conditions before accepting them.",
                   "The recipe calls for butter, sugar, eggs, flour and a pinch of salt."]


def _sentence(rng: random.Random) -> str:
    tail = rng.choice(TAILS)
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{' ' + tail if tail else ''}."


def generate(count: int = 320, seed: int = 20261130) -> list[str]:
    """`count` texts: the fixed lists above, then generated sentences, paragraphs and long documents."""
    rng = random.Random(seed)
    texts = QUESTIONS + IMPERATIVES + CHAT + TECH + FOREIGN
    # mixed-language and mixed-register pairs
    for _ in range(16):
        texts.append(f"{rng.choice(FOREIGN)} {rng.choice(CHAT)}")
    # long documents (> 256 tokens: truncated) and medium paragraphs (40-150 tokens)
    for _ in range(12):
        parts = rng.randint(25, 40)
        texts.append(" ".join(rng.choice(PARAGRAPH_SEEDS + [_sentence(rng) for _ in range(4)]) for _ in range(parts)))
    for _ in range(30):
        parts = rng.randint(2, 8)
        texts.append(" ".join(_sentence(rng) if rng.random() < 0.6 else rng.choice(PARAGRAPH_SEEDS)
                              for _ in range(parts)))
    while len(texts) < count:
        kind = rng.random()
        if kind < 0.55:
            texts.append(_sentence(rng))
        elif kind < 0.7:
            texts.append(rng.choice(QUESTIONS).rstrip("?") + f" {rng.choice(TAILS)}?".replace(" ?", "?"))
        elif kind < 0.8:
            texts.append(_sentence(rng).upper() if rng.random() < 0.5 else _sentence(rng).lower())
        elif kind < 0.9:
            texts.append(f"{rng.choice(TECH)} {rng.choice(CHAT)}")
        else:
            texts.append(" ".join(rng.choice(OBJECTS) for _ in range(rng.randint(1, 3))))
    return list(dict.fromkeys(texts))[:count]


def calibration_texts(count: int = 320, seed: int = 20261130) -> list[str]:
    """The built-in calibration set; never a validation text (the gate's data), never an empty one."""
    texts = generate(count, seed)
    overlap = set(texts) & set(VALIDATION_TEXTS)
    if overlap or not all(text.strip() for text in texts):
        raise AssertionError(f"calibration texts overlap the validation texts or are empty: {sorted(overlap)}")
    return texts


QUESTION_WORDS = 4  # a calibration question: the first words of a text


def calibration_examples(pairs: bool, questions: bool) -> list[Example]:
    """The calibration set as a task takes it: texts, pairs of neighbouring texts, or (question, context) pairs
    whose question is the first words of a text, so both segments of a pair are calibrated."""
    texts = calibration_texts()
    if not pairs:
        return texts
    firsts, seconds = texts[0::2], texts[1::2]
    if questions:
        firsts = [" ".join(text.split()[:QUESTION_WORDS]).rstrip("?.!,") + "?" for text in firsts]
    return list(zip(firsts, seconds))
