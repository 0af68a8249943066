"""Write an invented multi-turn preference set in Anthropic's HH-RLHF form, to try the chat path as a user
would: `rlhf import` (label it), `rlhf train-rm`, `rlhf eval-rm` (README.md, "Bring your own chat data").

Each row is {"chosen", "rejected"}: two transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") of one to three
exchanges that share every turn but the last assistant reply. The chosen reply answers the last question; the
rejected one fails in one of five ways, named in the test file's `subset` column so that `rlhf eval-rm` reports
the accuracy per kind of failure (RewardBench-style):

- refusal: declines a harmless request;
- off-topic: a good answer to a question from another conversation;
- stale: answers the conversation's FIRST question again instead of the last (only a reader of the whole
  conversation can tell; the reply is on topic);
- rude: dismisses the user;
- vague: says nothing specific.

The dialogues are invented from the small table below, deterministically for a seed: no data is downloaded.
The held-out file's conversations are about topics the training file never mentions (`HELD_OUT_TOPICS`).

    python bench/make_chat_preferences.py --out bench/data/chat_preferences --train 400 --test 120
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

# topic -> (opening request, [(question, answer), ...]): every answer is specific to its question.
TOPICS = {
    "sourdough": ("I want to bake sourdough bread at home.", [
        ("How often should I feed the starter?", "Feed it once a day at room temperature, equal weights of flour "
         "and water; in the fridge once a week is enough."),
        ("Why is my loaf so dense?", "Usually the dough was under-proofed: let the bulk rise go until it has grown "
         "by about half and shows bubbles on the sides."),
        ("What oven temperature do you recommend?", "Bake at 250 C in a preheated Dutch oven for 20 minutes with "
         "the lid on, then 20 more at 230 C without it."),
        ("How do I get a crispier crust?", "Trap steam for the first 20 minutes (the lid does that), then bake "
         "uncovered until the crust is deep brown."),
    ]),
    "tomatoes": ("I'm growing tomatoes on my balcony.", [
        ("How much should I water them?", "Water deeply when the top 2 cm of soil is dry, usually every one or two "
         "days in summer, at the base rather than on the leaves."),
        ("Why are the leaves turning yellow?", "Lower leaves yellowing is often a nitrogen shortage or "
         "overwatering; feed a balanced fertiliser and let the pot drain."),
        ("Do they need a support?", "Yes, tie indeterminate varieties to a stake or cage as they grow, loosely, "
         "every 20 cm or so."),
        ("When should I pick them?", "Pick when they are fully coloured and give slightly to a gentle squeeze; "
         "they keep ripening indoors if picked a little early."),
    ]),
    "python": ("I'm learning Python.", [
        ("How do I read a file line by line?", "Use `with open(path) as f:` and then `for line in f:`; the file "
         "closes itself when the block ends."),
        ("What is a list comprehension?", "A compact way to build a list: `[x * 2 for x in numbers if x > 0]` "
         "doubles the positive numbers."),
        ("How do I handle an error?", "Wrap the code in `try:` and catch the specific exception, for example "
         "`except FileNotFoundError:`, rather than every exception."),
        ("How do I install a package?", "Create a virtual environment with `python -m venv .venv`, activate it, "
         "then run `pip install` with the package name."),
    ]),
    "running": ("I'd like to start running.", [
        ("How far should I run in the first week?", "Start with run-walk intervals: one minute running, two "
         "walking, for 20 minutes, three times in the week."),
        ("My knees hurt after running, what should I do?", "Shorten your stride, run on softer ground, and rest "
         "a few days; see a physiotherapist if the pain stays."),
        ("Which shoes should I buy?", "Buy neutral running shoes fitted in a store late in the day, with a "
         "thumb's width of room in front of the toes."),
        ("How do I breathe while running?", "Breathe through both nose and mouth at an easy rhythm; if you cannot "
         "speak a short sentence, slow down."),
    ]),
    "budget": ("I want to get my monthly budget under control.", [
        ("Where do I start?", "List last month's spending from your bank statements and sort it into needs, wants "
         "and savings."),
        ("How much should I save each month?", "A common rule is 20 percent of take-home pay; start with any "
         "fixed amount moved automatically on payday."),
        ("Should I pay off debt or save first?", "Keep a small emergency fund of one month's costs, then pay "
         "the highest-interest debt first."),
        ("How do I stop impulse buying?", "Wait 48 hours before any unplanned purchase and remove saved cards "
         "from shopping sites."),
    ]),
    "cat": ("I just adopted a cat.", [
        ("How often should I feed her?", "Adult cats do well on two measured meals a day; kittens need three or "
         "four smaller ones."),
        ("She scratches the sofa. What can I do?", "Put a tall, sturdy scratching post next to the sofa and "
         "reward her when she uses it."),
        ("How many litter boxes do I need?", "One per cat plus one, in quiet places, scooped every day."),
        ("Why does she hide all day?", "New cats often hide for a few days; give her a quiet room and let her "
         "come to you."),
    ]),
    "guitar": ("I'm teaching myself guitar.", [
        ("Which chords should I learn first?", "Start with G, C, D, E minor and A minor: together they play "
         "hundreds of songs."),
        ("My fingertips hurt. Is that normal?", "Yes, for the first two or three weeks; practise in short "
         "sessions and calluses will form."),
        ("How do I tune it?", "Use a clip-on tuner and tune the strings to E A D G B E from the thickest to the "
         "thinnest."),
        ("How long should I practise each day?", "Fifteen to thirty focused minutes every day beats a long "
         "session once a week."),
    ]),
    "japan": ("I'm planning a trip to Japan.", [
        ("Is a rail pass worth it?", "Only if you make several long trips, such as Tokyo to Kyoto and back; for "
         "one city a rechargeable IC card is cheaper."),
        ("What is the best season to go?", "Spring for the cherry blossoms and autumn for the colours; both are "
         "busy, so book early."),
        ("Do I need cash?", "Yes, carry some yen: many small restaurants and temples take cash only."),
        ("Any etiquette I should know?", "Take off your shoes where you see a step up at the entrance, and do not "
         "tip in restaurants."),
    ]),
    "sleep": ("I've been sleeping badly lately.", [
        ("What can I change in the evening?", "Stop screens an hour before bed, keep the room cool and dark, and "
         "go to bed at the same time every night."),
        ("Is coffee a problem?", "Caffeine lasts for hours: have your last coffee before early afternoon."),
        ("Should I nap during the day?", "Keep naps under 20 minutes and before 3 pm, or skip them while you "
         "reset your rhythm."),
        ("What if I wake up at night?", "If you are awake for more than 20 minutes, get up and read in dim light "
         "until you feel sleepy again."),
    ]),
    "car": ("My car has been acting up.", [
        ("The battery keeps dying. Why?", "Test the battery and the alternator; a battery older than four or five "
         "years often cannot hold a charge."),
        ("How often should I change the oil?", "Follow the manual, usually every 10,000 to 15,000 km or once a "
         "year with modern oil."),
        ("What does the check-engine light mean?", "It reports a stored fault code; an inexpensive OBD-II reader "
         "tells you which one."),
        ("How do I check tyre pressure?", "Measure when the tyres are cold with a gauge and compare with the "
         "sticker inside the driver's door."),
    ]),
    "resume": ("I'm updating my resume for a new job.", [
        ("How long should it be?", "One page for under ten years of experience, two at most otherwise."),
        ("What should go at the top?", "Your name, contact details and a two-line summary of what you do and the "
         "role you want."),
        ("How do I describe my past jobs?", "Use bullet points that start with a verb and give a result with a "
         "number, like 'cut report time by 30 percent'."),
        ("Should I include hobbies?", "Only if they show a skill that matters for the job, or space allows."),
    ]),
    "stars": ("I've started stargazing.", [
        ("What can I see without a telescope?", "The Moon's seas, five planets, the Milky Way from a dark site, "
         "and the Andromeda galaxy as a faint smudge."),
        ("How do I find the North Star?", "Follow the two end stars of the Big Dipper's bowl upwards about five "
         "times their distance."),
        ("Which binoculars are good for the sky?", "7x50 or 10x50 binoculars: wide, bright and steady enough to "
         "hold by hand."),
        ("When is the next good meteor shower?", "The Perseids in mid-August and the Geminids in mid-December "
         "are the most reliable each year."),
    ]),
    "spanish": ("I'm learning Spanish.", [
        ("What's the difference between ser and estar?", "Ser is for lasting traits and identity, estar for states "
         "and locations: 'soy alto' but 'estoy cansado'."),
        ("How can I practise speaking?", "Find a language exchange partner online and talk for half an hour twice "
         "a week."),
        ("How do I roll my R?", "Say 'butter' fast in an American accent: the tapped 'tt' is the single r; repeat "
         "it quickly for the rolled rr."),
        ("How many words do I need?", "About 1,000 common words cover most of everyday conversation."),
    ]),
    "houseplants": ("My houseplants keep dying.", [
        ("How do I know when to water?", "Push a finger into the soil: water only when the top few centimetres "
         "are dry."),
        ("Which plants are hard to kill?", "Snake plants, pothos and ZZ plants tolerate low light and missed "
         "waterings."),
        ("Do they need fertiliser?", "Feed monthly in spring and summer at half strength, and not at all in "
         "winter."),
        ("Why are there tiny flies around them?", "Fungus gnats breed in wet soil; let it dry out and use yellow "
         "sticky traps."),
    ]),
    "chess": ("I want to get better at chess.", [
        ("What should I study first?", "Tactics: solve a few puzzles a day on forks, pins and skewers."),
        ("Which opening should I learn?", "Play the Italian Game as White and learn its main ideas rather than "
         "long lines."),
        ("How do I stop losing pieces?", "Before each move, check every capture and check your opponent could "
         "make in reply."),
        ("Are fast games useful?", "Play longer games of 15 minutes or more to think, and review your losses."),
    ]),
    "coffee": ("I want to make better coffee at home.", [
        ("What grind should I use for a French press?", "A coarse grind, like sea salt, and four minutes of "
         "steeping."),
        ("How much coffee per cup?", "About 15 grams of coffee for 250 ml of water is a good starting ratio."),
        ("What water temperature is best?", "Just off the boil, 92 to 96 C."),
        ("How should I store the beans?", "In an airtight container away from light and heat, and grind just "
         "before brewing."),
    ]),
}

REFUSALS = ["I'm sorry, but I can't help with that.", "I am not able to assist with this request.",
            "That's not something I can help you with, sorry.", "I'd rather not answer that."]
RUDE = ["That's a silly question. Look it up yourself.", "Why are you asking me? Figure it out.",
        "Honestly, that's obvious. Try harder.", "Not my problem, sorry."]
VAGUE = ["It depends on a lot of things, really.", "There are many ways to look at it.",
         "Everyone has their own approach to that.", "It varies from case to case."]
ACKS = ["Thanks!", "Thank you, that helps.", "Great, thanks.", "OK, got it.", ""]
FAILURES = ("refusal", "off-topic", "stale", "rude", "vague")


def dialogue(rng: random.Random, topic: str, failure: str, topics: list[str]) -> tuple[list[tuple[str, str]], str,
                                                                                      str]:
    """(turns before the reply, chosen reply, rejected reply): 1-3 exchanges ending in a user question; an
    off-topic reply comes from another of `topics`."""
    opener, qas = TOPICS[topic]
    exchanges = rng.randint(1, 3)
    asked = rng.sample(qas, exchanges)
    turns = []
    for i, (question, answer) in enumerate(asked):
        ack = rng.choice(ACKS) if i else ""
        text = f"{opener} {question}" if i == 0 else f"{ack} {question}".strip()
        turns.append(("Human", text))
        if i < exchanges - 1:
            turns.append(("Assistant", answer))
    chosen = asked[-1][1]
    if failure == "refusal":
        rejected = rng.choice(REFUSALS)
    elif failure == "rude":
        rejected = rng.choice(RUDE)
    elif failure == "vague":
        rejected = rng.choice(VAGUE)
    elif failure == "off-topic":
        other = rng.choice([t for t in topics if t != topic])
        rejected = rng.choice(TOPICS[other][1])[1]
    else:  # stale: the first question's answer again (needs two or more questions)
        if exchanges == 1:
            asked.append(rng.choice([qa for qa in qas if qa not in asked]))
            turns += [("Assistant", asked[0][1]), ("Human", f"{rng.choice(ACKS)} {asked[-1][0]}".strip())]
            chosen = asked[-1][1]
        rejected = asked[0][1]
    return turns, chosen, rejected


def transcript(turns: list[tuple[str, str]], reply: str) -> str:
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns) + f"\n\nAssistant: {reply}"


HELD_OUT_TOPICS = ("chess", "coffee", "spanish", "stars")
"""The test file's conversations are about these topics only, and the training file's never: the held-out
accuracy measures what carries over to new conversations, not memorised ones."""


def rows(n: int, seed: int, topics: list[str], with_subset: bool) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(topics)
        failure = FAILURES[i % len(FAILURES)]
        turns, chosen, rejected = dialogue(rng, topic, failure, topics)
        row = {"chosen": transcript(turns, chosen), "rejected": transcript(turns, rejected)}
        if with_subset:
            row["subset"] = failure
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/data/chat_preferences", help="output folder")
    parser.add_argument("--train", type=int, default=400, help="training rows (train.jsonl.gz)")
    parser.add_argument("--test", type=int, default=120, help="held-out rows with a subset column (test.jsonl)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = rows(args.train, args.seed, sorted(set(TOPICS) - set(HELD_OUT_TOPICS)), False)
    test = rows(args.test, args.seed + 1, list(HELD_OUT_TOPICS), True)
    with gzip.open(out / "train.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in train)
    (out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test), encoding="utf-8")
    turns = [r["chosen"].count("\n\nHuman:") for r in train]
    print(f"wrote {len(train)} training rows ({sum(turns) / len(turns):.2f} user turns on average, "
          f"{len(set(r['chosen'] for r in train))} distinct dialogues) to {out / 'train.jsonl.gz'} and {len(test)} "
          f"held-out rows with a subset column to {out / 'test.jsonl'}")


if __name__ == "__main__":
    main()
