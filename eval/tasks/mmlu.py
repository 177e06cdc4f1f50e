"""MMLU as lm-eval's `mmlu` (default variant), 5-shot by default.

Prompt: the subject header, then the first `num_fewshot` dev rows of the subject with their answers, then the
question; the model scores the continuations " A" .. " D" and the highest log-likelihood is its choice.
`acc` is the micro average over questions (lm-eval's group number), `acc_macro` the mean of subject accuracies
(the number Meta reports).
"""

from __future__ import annotations

from ..data import load_mmlu

CATEGORIES = {
    "stem": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning"
    ).split(),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"
    ).split(),
    "social_sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology public_relations "
        "security_studies sociology us_foreign_policy"
    ).split(),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
        "professional_law world_religions"
    ).split(),
}
SUBJECTS = sorted(s for subjects in CATEGORIES.values() for s in subjects)
CATEGORY_OF = {s: c for c, subjects in CATEGORIES.items() for s in subjects}
LETTERS = ("A", "B", "C", "D")


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_text(row: dict) -> str:
    """Only the question is stripped; choices keep their whitespace (lm-eval's doc_to_text)."""
    c = row["choices"]
    return f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def build_prompt(subject: str, shots: list[dict], row: dict) -> str:
    parts = [description(subject)]
    for shot in shots:
        parts.append(f"{question_text(shot)} {LETTERS[shot['answer']]}\n\n")
    parts.append(question_text(row))
    return "".join(parts)


class MMLU:
    name = "mmlu"
    default_fewshot = 5

    def __init__(self, data_dir=None, num_fewshot: int | None = None, limit: int | None = None, subjects=None):
        self.num_fewshot = self.default_fewshot if num_fewshot is None else num_fewshot
        if not 0 <= self.num_fewshot <= 5:
            raise ValueError(f"MMLU has 5 dev examples per subject; num_fewshot must be 0-5, got {self.num_fewshot}")
        unknown = sorted(set(subjects or ()) - set(SUBJECTS))
        if unknown:
            raise ValueError(f"unknown MMLU subjects {unknown}; valid names are {SUBJECTS}")
        self.subjects = list(subjects) if subjects else SUBJECTS
        self.data_dir, self.limit = data_dir, limit

    def config(self) -> dict:
        return {"num_fewshot": self.num_fewshot}

    def docs(self) -> list[dict]:
        """Docs in subject order; `limit` applies per subject, as lm-eval's --limit does for each subtask."""
        data = load_mmlu(self.data_dir)
        missing = [s for s in self.subjects if s not in data or not data[s]["test"]]
        if missing:
            raise ValueError(f"MMLU data has no test rows for subjects {missing}")
        docs = []
        for subject in self.subjects:
            shots = data[subject]["dev"][: self.num_fewshot]
            if len(shots) < self.num_fewshot:
                raise ValueError(f"MMLU subject {subject} has {len(shots)} dev rows, {self.num_fewshot} shots needed")
            rows = data[subject]["test"][: self.limit] if self.limit else data[subject]["test"]
            for i, row in enumerate(rows):
                docs.append(
                    {
                        "doc_id": f"{subject}/{i}",
                        "subject": subject,
                        "prompt": build_prompt(subject, shots, row),
                        "gold": row["answer"],
                    }
                )
        return docs

    def chunks(self, docs: list[dict]) -> list[list[dict]]:
        """One chunk per subject: its questions share the header-and-shots prefix."""
        by_subject: dict[str, list[dict]] = {}
        for d in docs:
            by_subject.setdefault(d["subject"], []).append(d)
        return list(by_subject.values())

    def run(self, runner, docs: list[dict]) -> list[dict]:
        requests = [(d["prompt"], f" {letter}") for d in docs for letter in LETTERS]
        groups = [d["subject"] for d in docs for _ in LETTERS]
        scores = runner.loglikelihood(requests, groups=groups, desc=f"mmlu {docs[0]['subject']}" if docs else "mmlu")
        records = []
        for k, d in enumerate(docs):
            lls = [scores[4 * k + j][0] for j in range(4)]
            pred = max(range(4), key=lambda j: lls[j])
            records.append(
                {
                    "doc_id": d["doc_id"],
                    "subject": d["subject"],
                    "prompt": d["prompt"],
                    "loglikelihoods": lls,
                    "output": LETTERS[pred],
                    "extracted": pred,
                    "gold": d["gold"],
                    "correct": pred == d["gold"],
                }
            )
        return records

    def aggregate(self, records: list[dict]) -> dict:
        if not records:
            raise ValueError("no MMLU samples to aggregate")
        per_subject: dict[str, list[bool]] = {}
        for r in records:
            per_subject.setdefault(r["subject"], []).append(bool(r["correct"]))
        subject_acc = {s: sum(v) / len(v) for s, v in sorted(per_subject.items())}
        per_category: dict[str, list[bool]] = {}
        for s, v in per_subject.items():
            per_category.setdefault(CATEGORY_OF[s], []).extend(v)
        return {
            "acc": sum(bool(r["correct"]) for r in records) / len(records),
            "acc_macro": sum(subject_acc.values()) / len(subject_acc),
            "n": len(records),
            "categories": {c: sum(v) / len(v) for c, v in sorted(per_category.items())},
            "subjects": subject_acc,
        }
