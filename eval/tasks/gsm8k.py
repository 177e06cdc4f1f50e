"""GSM8K in lm-eval's `gsm8k` and `gsm8k_cot` formats, plus `gsm8k_chat` (zero-shot through a chat template).

- gsm8k: 5 shots drawn with random.Random(1234).sample(train, 5) once per test question, in test order (one RNG
  for the task, so question i always gets the same shots whatever the limit); "Question: ...\nAnswer:" prompts;
  strict answer after "#### ".
- gsm8k_cot: the 8 fixed chain-of-thought exemplars of Wei et al.; "Q: ...\nA:" prompts; strict answer after
  "The answer is".
- gsm8k_chat: the question as a user turn through `tokenizer.apply_chat_template(add_generation_prompt=True,
  enable_thinking=True)`, asking for "The final answer is N" (lm-eval's gsm8k_cot_llama instruction); strict answer
  after "The final answer is". Reasoning markers are special tokens and vanish with skip_special_tokens, as in
  lm-eval, so the extractors see the reasoning and the answer as one text.
All three report `exact_match_strict` and `exact_match_flexible` (last number in the output).
"""

from __future__ import annotations

import random
import re
import warnings

from .. import metrics
from ..data import load_split

# The 8 exemplars of gsm8k-cot (question, target), verbatim.
COT_EXEMPLARS = (
    (
        'There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?',
        'There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6.',
    ),
    (
        'If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?',
        'There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.',
    ),
    (
        'Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?',
        'Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39.',
    ),
    (
        'Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?',
        'Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8.',
    ),
    (
        'Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?',
        'Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9.',
    ),
    (
        'There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?',
        'There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.',
    ),
    (
        'Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?',
        'Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.',
    ),
    (
        'Olivia has $23. She bought five bagels for $3 each. How much money does she have left?',
        'Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.',
    ),
)

CHAT_INSTRUCTION = (
    "Given the following problem, reason and give a final answer to the problem.\nProblem: {question}\n"
    'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.'
)
_CALCULATOR = re.compile(r"<<[^>]*>>")


class GSM8K:
    """lm-eval's `gsm8k` (5-shot, random shots from train)."""

    name = "gsm8k"
    default_fewshot = 5
    until = ("Question:", "</s>", "<|im_end|>")
    strict = metrics.STRICT_GSM8K
    default_max_gen_toks = 256

    def __init__(self, data_dir=None, num_fewshot=None, limit=None, max_gen_toks=None, tokenizer=None):
        self.num_fewshot = self.default_fewshot if num_fewshot is None else num_fewshot
        if self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        self.max_gen_toks = max_gen_toks or self.default_max_gen_toks
        self.data_dir, self.limit, self.tokenizer = data_dir, limit, tokenizer

    def config(self) -> dict:
        return {"num_fewshot": self.num_fewshot, "max_gen_toks": self.max_gen_toks}

    def test_rows(self) -> list[dict]:
        rows = load_split("gsm8k", "test", self.data_dir)
        return rows[: self.limit] if self.limit else rows

    def prompts(self, rows: list[dict]) -> list[str]:
        train = load_split("gsm8k", "train", self.data_dir) if self.num_fewshot else []
        rnd = random.Random(1234)
        out = []
        for row in rows:
            shots = rnd.sample(train, self.num_fewshot) if self.num_fewshot else []
            text = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
            out.append(text + f"Question: {row['question']}\nAnswer:")
        return out

    def docs(self) -> list[dict]:
        rows = self.test_rows()
        return [
            {"doc_id": i, "prompt": p, "gold": metrics.gsm8k_reference(r["answer"])}
            for i, (r, p) in enumerate(zip(rows, self.prompts(rows)))
        ]

    def chunks(self, docs: list[dict]) -> list[list[dict]]:
        # Small enough that an interrupted run loses little, large enough to batch and to amortise the prefix.
        return [docs[i:i + 64] for i in range(0, len(docs), 64)]

    def generation_kwargs(self) -> dict:
        return {"until": self.until, "max_gen_toks": self.max_gen_toks}

    def run(self, runner, docs: list[dict]) -> list[dict]:
        outputs = runner.generate([d["prompt"] for d in docs], desc=self.name, **self.generation_kwargs())
        return [self.score(d, out) for d, out in zip(docs, outputs)]

    def score(self, doc: dict, output: str) -> dict:
        strict, flexible = self.strict(output), metrics.FLEXIBLE(output)
        return {
            "doc_id": doc["doc_id"],
            "prompt": doc["prompt"],
            "output": output,
            "extracted_strict": strict,
            "extracted_flexible": flexible,
            "gold": doc["gold"],
            "correct_strict": metrics.exact_match(strict, doc["gold"]),
            "correct_flexible": metrics.exact_match(flexible, doc["gold"]),
        }

    def aggregate(self, records: list[dict]) -> dict:
        if not records:
            raise ValueError(f"no {self.name} samples to aggregate")
        n = len(records)
        return {
            "exact_match_strict": sum(r["correct_strict"] for r in records) / n,
            "exact_match_flexible": sum(r["correct_flexible"] for r in records) / n,
            "n": n,
        }


class GSM8KCoT(GSM8K):
    """lm-eval's `gsm8k_cot` (8 fixed chain-of-thought shots)."""

    name = "gsm8k_cot"
    default_fewshot = 8
    until = ("Q:", "</s>", "<|im_end|>")
    strict = metrics.STRICT_GSM8K_COT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.num_fewshot > len(COT_EXEMPLARS):
            raise ValueError(f"gsm8k_cot has {len(COT_EXEMPLARS)} exemplars; num_fewshot={self.num_fewshot} is too many")

    def prompts(self, rows: list[dict]) -> list[str]:
        shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in COT_EXEMPLARS[: self.num_fewshot])
        return [shots + f"Q: {row['question']}\nA:" for row in rows]


class GSM8KChat(GSM8K):
    """Zero-shot GSM8K through the tokenizer's chat template with reasoning enabled."""

    name = "gsm8k_chat"
    default_fewshot = 0
    until = ()
    strict = metrics.STRICT_FINAL_ANSWER
    default_max_gen_toks = 1024

    def config(self) -> dict:
        return {**super().config(), "chat_template": self._has_template()}

    def _has_template(self) -> bool:
        return bool(self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None))

    def prompts(self, rows: list[dict]) -> list[str]:
        train = load_split("gsm8k", "train", self.data_dir)[: self.num_fewshot] if self.num_fewshot else []
        if not self._has_template():
            warnings.warn(
                "gsm8k_chat: the tokenizer has no chat template; falling back to plain-text prompts "
                "(the instruction followed by a newline), so the numbers are not chat-format numbers",
                stacklevel=2,
            )
            shots = "".join(
                CHAT_INSTRUCTION.format(question=s["question"]) + "\n" + _worked_answer(s["answer"]) + "\n\n"
                for s in train
            )
            return [shots + CHAT_INSTRUCTION.format(question=row["question"]) + "\n" for row in rows]
        shot_turns = []
        for s in train:
            shot_turns.append({"role": "user", "content": CHAT_INSTRUCTION.format(question=s["question"])})
            shot_turns.append({"role": "assistant", "content": _worked_answer(s["answer"])})
        return [
            self.tokenizer.apply_chat_template(
                [*shot_turns, {"role": "user", "content": CHAT_INSTRUCTION.format(question=row["question"])}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
            )
            for row in rows
        ]

    def generation_kwargs(self) -> dict:
        until = self.until if self._has_template() else ("Given the following problem", "</s>", "<|im_end|>")
        return {"until": until, "max_gen_toks": self.max_gen_toks}


def _worked_answer(answer: str) -> str:
    """A GSM8K solution without calculator annotations, ending "The final answer is N"."""
    rationale = _CALCULATOR.sub("", answer.split("####")[0]).strip()
    return f"{rationale}\nThe final answer is {metrics.gsm8k_reference(answer)}"
