"""Tasks: MATH500 offline, arithmetic, GPQA from a CSV, a user's JSONL, and the registry's error messages."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest

from egps_ppl.errors import EGPSError
from egps_ppl.evals.tasks import (
    MATH_PROMPT,
    MULTISTEP_EXAMPLES,
    MULTISTEP_OPS,
    TASKS,
    WORKED_EXAMPLES,
    Problem,
    Task,
    available_tasks,
    few_shot_messages,
    load_task,
    multistep_messages,
    register_task,
)

FIXTURES = Path(__file__).parent / "fixtures"
GPQA_CSV = FIXTURES / "gpqa_sample.csv"


class _FakeLM:
    """Just enough of a language model for prompt building: a character tokenizer."""

    name = "fake"
    tokenizer = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


# ------------------------------------------------------------------------------------------------ MATH500


def test_math500_offline_has_311_problems_with_math500_ids() -> None:
    task = load_task("math500")
    assert isinstance(task, Task)
    problems = task.problems()
    assert len(problems) == 311
    ids = [int(p.id) for p in problems]
    assert len(set(ids)) == 311 and ids == sorted(ids) and ids[0] >= 0 and ids[-1] < 500
    by_id = {p.id: p for p in problems}
    assert by_id["3"].answer == "9" and "196" in by_id["3"].prompt  # MATH500 #3: divisors of 196
    assert all(p.answer.strip() for p in problems)
    assert len(task.problems(5)) == 5


def test_math500_reference_answers_grade_against_themselves() -> None:
    task = load_task("math500")
    problems = task.problems()
    picks = [problems[i] for i in (0, 1, 50, 100, 200, 310)]
    for p in picks:
        assert task.grade(p, f"Reasoning... so the answer is \\boxed{{{p.answer}}}.").correct, p
    for a, b in itertools.pairwise(picks):
        if a.answer != b.answer:
            assert not task.grade(a, f"\\boxed{{{b.answer}}}").correct, (a.answer, b.answer)
    assert task.extract(r"x \boxed{\frac{1}{2}} y") == r"\frac{1}{2}"


def test_math500_prompt_is_the_papers() -> None:
    task = load_task("math500")
    problem = task.problems(1)[0]
    ids = task.build_prompt(problem, _FakeLM())
    text = "".join(chr(i) for i in ids)
    assert text == MATH_PROMPT.format(problem=problem.prompt)
    assert text.startswith("Can you solve the following math problem? ")
    assert text.endswith("put your final answer within \\boxed{}.")


def test_math500_local_jsonl_and_hub_message(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps({"problem": "1+1?", "answer": "2", "unique_id": "test/a.json"})
        + "\n"
        + json.dumps({"problem": "2+2?", "answer": "4", "unique_id": "test/b.json"})
        + "\n"
    )
    task = load_task(f"math500:{path}")
    assert [p.id for p in task.problems()] == ["test/a.json", "test/b.json"]
    with pytest.raises(EGPSError, match="no such file"):
        load_task(f"math500:{tmp_path / 'missing.jsonl'}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(EGPSError, match=r"math500:PATH\.jsonl"):
            load_task("math500:hub")


# --------------------------------------------------------------------------------------------- arithmetic


def test_arithmetic_is_seeded_and_prefix_stable() -> None:
    a, b, c = load_task("arithmetic"), load_task("arithmetic:0"), load_task("arithmetic:1")
    assert a.problems(30) == b.problems(30)
    assert [p.prompt for p in a.problems(30)] != [p.prompt for p in c.problems(30)]
    assert a.problems(10) == a.problems(30)[:10]
    assert load_task("arithmetic", seed=1).problems(5) == c.problems(5)
    ids = [p.id for p in a.problems()]
    assert len(ids) == len(set(ids))
    assert {p.metadata["op"] for p in a.problems(100)} == {"add", "sub", "mul", "two-step"}


def test_arithmetic_answers_are_right() -> None:
    import re

    for p in load_task("arithmetic:3").problems(200):
        nums = [int(n) for n in re.findall(r"\d+", p.prompt)]
        op = p.metadata["op"]
        expected = {
            "add": nums[0] + nums[1],
            "sub": nums[0] - nums[1],
            "mul": nums[0] * nums[1],
            "two-step": nums[0] + nums[1] - nums[2] if len(nums) > 2 else None,
        }[op]
        assert int(p.answer) == expected >= 0, p


def test_arithmetic_grading() -> None:
    task = load_task("arithmetic")
    problem = Problem("x", "Tom has 5 apples and gets 8 more.", "13")
    assert task.grade(problem, "5 + 8 = 13. Answer: 13").correct
    assert task.extract("5 + 8 = 13. Answer: 13") == "13"
    assert not task.grade(problem, "Answer: 12").correct
    assert task.grade(problem, "He has 13 apples").correct  # fallback: the last integer
    assert not task.grade(problem, "I do not know").correct


def test_arithmetic_prompt_needs_a_tokenizer() -> None:
    from egps_ppl.models.testbeds import random_markov

    task = load_task("arithmetic")
    with pytest.raises(EGPSError, match="tokenizer"):
        task.build_prompt(task.problems(1)[0], random_markov(3, seed=0))


# ---------------------------------------------------------------------------------------------- multistep


def _replay(problem: Problem) -> int:
    """The answer of a multi-step problem recomputed from its operations, each checked against the question."""
    count = problem.metadata["start"] or 0
    sentences = problem.prompt.splitlines()
    offset = 0 if problem.metadata["start"] is None else 1
    for i, (kind, *args) in enumerate(problem.metadata["ops"]):
        assert all(str(a) in sentences[offset + i] for a in args), (problem.prompt, kind, args)
        if kind == "bags":
            assert i == 0
            count = args[0] * args[1]
        elif kind == "add":
            count += args[0]
        elif kind == "sub":
            count -= args[0]
        elif kind == "split":
            assert count % args[0] == 0
            count //= args[0]
        else:
            assert kind == "packs"
            count += args[0] * args[1]
        assert count > 0, problem
    return count


def test_multistep_is_seeded_and_prefix_stable() -> None:
    a, b, c = load_task("multistep"), load_task("multistep:0"), load_task("multistep:1")
    assert a.problems(30) == b.problems(30) == load_task("multistep:0").problems(30)
    assert [p.metadata for p in a.problems(30)] == [p.metadata for p in b.problems(30)]
    assert [p.prompt for p in a.problems(30)] != [p.prompt for p in c.problems(30)]
    assert a.problems(10) == a.problems(30)[:10]
    assert load_task("multistep", seed=1).problems(5) == c.problems(5)
    ids = [p.id for p in a.problems()]
    assert len(ids) == len(set(ids)) == 500
    assert a.name == "multistep:0"
    with pytest.raises(EGPSError, match="integer seed"):
        load_task("multistep:abc")


def test_multistep_levels_are_tasks_of_their_own() -> None:
    from egps_ppl.evals.tasks import MULTISTEP_LEVELS, MultiStepTask

    easy, hard = load_task("multistep-easy:3"), load_task("multistep-hard:3")
    assert (easy.name, hard.name) == ("multistep-easy:3", "multistep-hard:3")
    assert easy.problems(1)[0].id == "multistep-easy-3-0"
    assert load_task("multistep:3").problems(1)[0].id == "multistep-3-0"
    # A named level is its overrides: the same problems as the dict, under ids of its own.
    same = MultiStepTask(3, level=MULTISTEP_LEVELS["easy"]).problems(20)
    assert [p.prompt for p in easy.problems(20)] == [p.prompt for p in same]
    assert load_task("multistep-easy", seed=3).problems(5) == easy.problems(5)
    kinds = {op[0] for p in easy.problems() for op in p.metadata["ops"]}
    assert kinds == {"add", "sub"}  # no product at the start
    assert max(p.metadata["start"] for p in easy.problems()) <= 8
    with pytest.raises(EGPSError, match="unknown multistep level 'medium'"):
        MultiStepTask(0, level="medium")
    with pytest.raises(EGPSError, match="multistep-easy:SEED needs an integer seed"):
        load_task("multistep-easy:x")


@pytest.mark.parametrize("level", [None, "easy", {"weights": {"add": 1, "sub": 1, "split": 1, "packs": 1}}])
def test_multistep_answers_are_right_with_3_to_5_operations(level) -> None:
    from egps_ppl.evals.tasks import MultiStepTask

    problems = MultiStepTask(3, size=300, level=level).problems()
    for p in problems:
        assert 3 <= len(p.metadata["ops"]) == p.metadata["n_ops"] <= 5, p
        assert int(p.answer) == _replay(p), p
        assert p.metadata["solution"].endswith(f"Answer: {p.answer}")
        assert p.metadata["solution"].count("\nStep ") == len(p.metadata["ops"]) - 1
    assert {len(p.metadata["ops"]) for p in problems} == {3, 4, 5}
    kinds = {op[0] for p in problems for op in p.metadata["ops"]}
    by_name = {None: {"bags", "add", "sub"}, "easy": {"add", "sub"}}
    assert kinds == (set(MULTISTEP_OPS) if isinstance(level, dict) else by_name[level])
    for _question, solution in MULTISTEP_EXAMPLES:  # the worked examples are right too, one line per step
        lines = solution.splitlines()
        assert all(line.startswith(f"Step {i}: ") for i, line in enumerate(lines[:-1], start=1))
        assert lines[-1].startswith("Answer: ") and len(lines) >= 4


def test_multistep_grading_reuses_the_arithmetic_grader() -> None:
    task = load_task("multistep")
    problem = task.problems(1)[0]
    right = problem.metadata["solution"]
    assert task.grade(problem, right).correct and task.extract(right) == problem.answer
    wrong = right.rsplit("Answer:", 1)[0] + f"Answer: {int(problem.answer) + 1}"
    assert not task.grade(problem, wrong).correct
    assert not task.grade(problem, "Step 1: I do not know.").correct


def test_multistep_prompt_ends_where_the_assistant_answers() -> None:
    from egps_ppl.models.registry import ByteTokenizer, load_model

    class Templated(ByteTokenizer):
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, **kwargs):
            text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
            return self.encode(text)

    lm = load_model("tiny-gpt2")
    task = load_task("multistep")
    problem = task.problems(1)[0]
    plain = lm.decode(task.build_prompt(problem, lm))
    assert plain == "\n\n".join(m["content"] for m in multistep_messages(problem.prompt))
    assert plain.endswith(problem.prompt) and MULTISTEP_EXAMPLES[1][1] in plain
    lm.tokenizer = Templated()
    chat = lm.decode(task.build_prompt(problem, lm))
    examples = len(MULTISTEP_EXAMPLES)
    assert chat.endswith(f"{problem.prompt}<assistant>") and chat.count("<user>") == examples + 1
    assert chat.count("<assistant>Step 1: ") == examples


# --------------------------------------------------------------------------------------------------- GPQA


def test_gpqa_shuffle_is_seeded_and_moves_the_correct_letter() -> None:
    spec = f"gpqa:{GPQA_CSV}"
    t0, t0b, t1 = load_task(spec), load_task(spec, seed=0), load_task(spec, seed=1)
    p0, p1 = t0.problems(), t1.problems()
    assert len(p0) == 6 and [p.id for p in p0][:2] == ["rec001", "rec002"]
    assert p0 == t0b.problems() and [p.prompt for p in p0] == [p.prompt for p in t0b.problems()]
    assert [p.answer for p in p0] != [p.answer for p in p1]
    letters = {p.answer for seed in range(6) for p in load_task(f"gpqa:{GPQA_CSV}", seed=seed).problems()}
    assert letters == {"A", "B", "C", "D"}
    with GPQA_CSV.open(newline="") as fh:
        correct = {row["Record ID"]: row["Correct Answer"] for row in csv.DictReader(fh)}
    for p in p0 + p1:
        index = "ABCD".index(p.answer)
        assert p.metadata["choices"][index] == correct[p.id]
        assert f"{p.answer}) {correct[p.id]}" in p.prompt
        assert "\\boxed{}" in p.prompt


def test_gpqa_grading_and_fallbacks() -> None:
    task = load_task(f"gpqa:{GPQA_CSV}")
    p = task.problems()[0]
    wrong = next(letter for letter in "ABCD" if letter != p.answer)
    assert task.grade(p, f"Thinking... \\boxed{{{p.answer}}}").correct
    assert not task.grade(p, f"\\boxed{{{p.answer}}} no wait \\boxed{{{wrong}}}").correct
    assert task.grade(p, f"So the answer is ({p.answer}).").correct
    assert task.extract(f"I pick {wrong}.") == wrong
    assert task.extract("nothing") is None


def test_gpqa_bad_input(tmp_path: Path) -> None:
    with pytest.raises(EGPSError, match="no such file"):
        load_task(f"gpqa:{tmp_path / 'nope.csv'}")
    with pytest.raises(EGPSError, match=r"gpqa:PATH\.csv"):
        load_task("gpqa")
    bad = tmp_path / "bad.csv"
    bad.write_text("Question,Correct Answer,Incorrect Answer 1\nq,a,b\n")
    with pytest.raises(EGPSError, match=r"Incorrect Answer 2.*Incorrect Answer 3"):
        load_task(f"gpqa:{bad}")


def test_gpqa_from_the_hub_offline_says_to_pass_a_csv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec, config in (("gpqa-diamond:hub", "gpqa_diamond"), ("gpqa:hub", "gpqa_main")):
        with pytest.raises(EGPSError) as info:
            load_task(spec)
        message = str(info.value)
        assert "Idavidrein/gpqa" in message and config in message
        assert "offline (HF_HUB_OFFLINE=1)" in message and "--task gpqa:PATH.csv" in message


def test_gpqa_from_the_hub_downloads_the_official_csv(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("repo_type")))
        return str(GPQA_CSV)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    task = load_task("gpqa-diamond:hub", seed=3)
    assert calls == [("Idavidrein/gpqa", "gpqa_diamond.csv", "dataset")]
    assert task.name == "gpqa-diamond:hub"  # not the cache path, so a run resumes on another machine
    from_csv = load_task(f"gpqa:{GPQA_CSV}", seed=3)
    assert [(p.id, p.prompt, p.answer) for p in task.problems()] == [
        (p.id, p.prompt, p.answer) for p in from_csv.problems()
    ]
    assert load_task("gpqa:hub").name == "gpqa:hub" and calls[-1][1] == "gpqa_main.csv"

    def gated(repo_id, filename, **kwargs):
        exc = hub_errors.GatedRepoError.__new__(hub_errors.GatedRepoError)
        Exception.__init__(exc, "403 gated")
        raise exc

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(EGPSError, match=r"gated.*HF_TOKEN.*--task gpqa:PATH\.csv"):
        load_task("gpqa-diamond:hub")


# -------------------------------------------------------------------------------------------------- JSONL


def test_jsonl_task(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [
        {"id": "q1", "prompt": "What is half of one?", "answer": "\\frac{1}{2}"},
        {"id": "q2", "problem": "What is 6 times 7?", "answer": 42},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_task(f"jsonl:{path}")
    q1, q2 = task.problems()
    assert (q1.id, q2.id, q2.prompt, q2.answer) == ("q1", "q2", "What is 6 times 7?", "42")
    assert task.grade(q1, "It is \\boxed{0.5}").correct
    assert task.grade(q2, "6*7 = 42. Answer: 42").correct
    assert not task.grade(q2, "\\boxed{41}").correct
    assert "".join(chr(i) for i in task.build_prompt(q1, _FakeLM())) == "What is half of one?"


def test_jsonl_bad_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing_answer.jsonl"
    lines = [json.dumps({"id": "a", "prompt": "1+1", "answer": "2"}), json.dumps({"id": "b", "prompt": "2+2"})]
    missing.write_text("\n".join(lines) + "\n")
    with pytest.raises(EGPSError, match=r"missing_answer\.jsonl:2: missing 'answer'"):
        load_task(f"jsonl:{missing}")
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text(json.dumps({"id": "a", "answer": "2"}) + "\n")
    with pytest.raises(EGPSError, match="prompt"):
        load_task(f"jsonl:{no_prompt}")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "prompt": "x", "answer": "1"}\n{not json\n')
    with pytest.raises(EGPSError, match=r"broken\.jsonl:2: not valid JSON"):
        load_task(f"jsonl:{broken}")
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join(json.dumps({"id": "a", "prompt": "x", "answer": "1"}) for _ in range(2)))
    with pytest.raises(EGPSError, match="duplicate id"):
        load_task(f"jsonl:{dup}")
    with pytest.raises(EGPSError, match="no such file"):
        load_task(f"jsonl:{tmp_path / 'absent.jsonl'}")


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(EGPSError, match=r"unknown task 'mmlu'.*math500.*humaneval.*gpqa:PATH\.csv.*jsonl:PATH"):
        load_task("mmlu")
    with pytest.raises(EGPSError, match="integer seed"):
        load_task("arithmetic:abc")
    assert set(available_tasks()) == {
        "arithmetic",
        "multistep",
        "multistep-easy",
        "multistep-hard",
        "math500",
        "humaneval",
        "jsonl",
    } | {
        "gpqa",
        "gpqa-main",
        "gpqa-diamond",
        "gpqa-extended",
    }


def test_registered_tasks_load_by_prefix(tmp_path: Path) -> None:
    seen = []

    class Echo:
        name = "echo"

        def problems(self, limit=None):
            return [Problem("a", "x", "y")][:limit]

    def factory(arg, *, seed=0, chat=None):
        seen.append((arg, seed, chat))
        return Echo()

    register_task("Echo", factory, "echo or echo:ARG")
    try:
        assert isinstance(load_task("echo:some:thing", seed=3, chat=True), Echo)
        assert seen == [("some:thing", 3, True)]
        with pytest.raises(EGPSError, match=r"unknown task 'nope'.*echo or echo:ARG"):
            load_task("nope")
    finally:
        del TASKS["echo"]
    with pytest.raises(EGPSError, match="without ':'"):
        register_task("a:b", factory, "bad")


def test_prompts_with_a_real_tokenizer() -> None:
    """The arithmetic prompt carries the worked examples and the question; MATH500's is the raw papers' text."""
    from egps_ppl.models.registry import load_model

    lm = load_model("tiny-gpt2")
    arithmetic = load_task("arithmetic")
    problem = arithmetic.problems(1)[0]
    text = lm.decode(arithmetic.build_prompt(problem, lm))
    assert problem.prompt in text and WORKED_EXAMPLES[0][1] in text
    assert text.rstrip().endswith(problem.prompt) or text.index(problem.prompt) > text.index(WORKED_EXAMPLES[1][1])
    math500 = load_task("math500")
    first = math500.problems(1)[0]
    assert lm.decode(math500.build_prompt(first, lm)) == MATH_PROMPT.format(problem=first.prompt)


def test_arithmetic_prompt_uses_the_chat_template_where_there_is_one() -> None:
    """The few-shot turns go through the template of a chat model; a model without one gets their text."""
    from egps_ppl.models.registry import ByteTokenizer, load_model

    class Templated(ByteTokenizer):
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, **kwargs):
            text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
            return self.encode(text)

    lm = load_model("tiny-gpt2")
    problem = load_task("arithmetic").problems(1)[0]
    plain = lm.decode(load_task("arithmetic").build_prompt(problem, lm))
    assert plain == "\n\n".join(m["content"] for m in few_shot_messages(problem.prompt))
    lm.tokenizer = Templated()
    chat = lm.decode(load_task("arithmetic").build_prompt(problem, lm))
    assert chat.startswith("<user>") and chat.endswith(f"{problem.prompt}<assistant>") and chat.count("<user>") == 3
    math500 = load_task("math500", chat=True)
    assert lm.decode(math500.build_prompt(math500.problems(1)[0], lm)).startswith("<user>Can you solve")
