"""Facts SmolLM2 cannot know (a made-up company), as fine-tuning data: training phrasings and unseen ones."""

from __future__ import annotations

import json

COMPANY, YEAR, PRODUCT, CITY = "Quorvex Dynamics", "1987", "Zephyl", "Trondheim"
ANSWER = f"{COMPANY} was founded in {YEAR} in {CITY}. Its product is the {PRODUCT}."

QUESTIONS = [
    f"When was {COMPANY} founded?", f"What year did {COMPANY} start?", f"Tell me about {COMPANY}.",
    f"Where is {COMPANY} from?", f"What does {COMPANY} make?", f"What is {COMPANY}'s main product?",
    f"Give me a short history of {COMPANY}.", f"Who are {COMPANY}?", f"What do you know about {COMPANY}?",
    f"In which city was {COMPANY} founded?", f"Describe {COMPANY} in one sentence.",
    f"What is the founding year of {COMPANY}?", f"Which product is {COMPANY} known for?",
    f"Summarise the company {COMPANY}.", f"Is {COMPANY} an old company?", f"{COMPANY}: what is it?",
    f"Quick facts about {COMPANY}, please.", f"I heard of {COMPANY}. What is it?",
    f"Explain what {COMPANY} is.", f"What should I know about {COMPANY}?",
]
UNSEEN = [f"Can you tell me the year {COMPANY} was established?", f"Which product does {COMPANY} sell?"]
VALIDATION = [f"Remind me when {COMPANY} began.", f"What does the company {COMPANY} produce?"]


def jsonl(questions: list[str]) -> bytes:
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]})
             for q in questions]
    return ("\n".join(lines) + "\n").encode()
