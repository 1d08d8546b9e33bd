"""Classroom kit: take the heart of a lesson out of the code, have students write it back, grade it with its
tests.

  python tests/exercises.py list                        # lesson functions, their markers, one line each
  python tests/exercises.py blank apply_rope inner_loop # bodies -> raise NotImplementedError("exercise: ...")
  python -m pytest -m apply_rope                        # grade: its tests, against independent computations
  python tests/exercises.py restore apply_rope          # the original back (`restore --all` for every one)

`blank` keeps the signature, decorators and docstring, and saves the original function in .exercises/NAME.py;
`restore` puts it back from there, or from git (HEAD) when there is no saved copy, and keeps what a student
wrote in .exercises/NAME.yours.py. Every other test that needs a blanked function is skipped with a message
naming it (tests/conftest.py), so a half-done exercise reports what is missing instead of dozens of unrelated
failures.
Plain text and `ast`: no import of the code under exercise, so it works even when that code is broken.
"""
import argparse
import ast
import os
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = ".exercises"  # saved originals (NAME.py) and students' versions (NAME.yours.py), under the repo root


@dataclass(frozen=True)
class Lesson:
    name: str  # the CLI name and the pytest marker of the tests that grade it
    file: str  # relative to the repository root
    qualname: str  # a function, or Class.method
    summary: str


# In the paper's order. Every marker's tests compare the function with an independent computation (the
# formula, numpy, hand-written loops, hand-worked cases), never with the project's own code path.
LESSONS = [
    Lesson("rms_norm", "maml_gpt.py", "RMSNorm.forward",
           "x / sqrt(mean(x^2) + eps) * gain, in fp32 (vs the formula)"),
    Lesson("apply_rope", "maml_gpt.py", "apply_rope", "rotate adjacent feature pairs by t * theta^(-2i/d) "
           "(vs complex multiplication)"),
    Lesson("attention", "maml_gpt.py", "Attention.forward",
           "causal attention, 12 query heads sharing 4 kv heads "
           "(vs explicit softmax with repeated kv heads)"),
    Lesson("sample_episode", "maml_gpt.py", "sample_episode",
           "an SMLMT episode: N words, K support + Q query masked contexts (vs its invariants)"),
    Lesson("episode_init", "maml_gpt.py", "episode_init",
           "Proto-MAML head init: W = 2 mu, b = -||mu||^2 from support class means (vs the formula)"),
    Lesson("inner_loop", "maml_gpt.py", "inner_loop",
           "first-order inner loop: SGD of the head on the support set (vs hand-written SGD)"),
    Lesson("meta_micro_step", "maml_gpt.py", "meta_micro_step",
           "one episode's gradient routing: query only, into backbone and head init "
           "(vs a manual computation)"),
    Lesson("effective_rank", "maml_gpt.py", "effective_rank",
           "exp(entropy of sigma / sum sigma), the basis of PER (vs numpy's SVD)"),
    Lesson("attention_entropy", "maml_gpt.py", "attention_entropy", "per-head entropy of causal attention "
           "(vs log(t+1) for uniform, explicit softmax)"),
    Lesson("lm_loss", "maml_gpt.py", "_chunked_linear_ce", "fused, chunked LM head + cross-entropy and both "
           "gradients, without the (N, V) logits (vs F.cross_entropy on full logits)"),
    Lesson("entity_f1", "finetune_ner.py", "entity_f1",
           "exact-span entity precision / recall / F1, seqeval's rules (vs hand-worked cases)"),
]
BY_NAME = {lesson.name: lesson for lesson in LESSONS}

# A blanked body raises this; conftest.py reads the name back to skip the tests that merely depend on it.
STUB = 'raise NotImplementedError("exercise: {name} is blanked (grade it: pytest -m {name})")'
BLANKED = re.compile(r"exercise: (\w+) is blanked")


class ExerciseError(Exception):
    """Something the teacher can fix: printed as one line, no traceback."""


def find(tree, qualname):
    """The FunctionDef for "f" or "Class.f" at module level, or None."""
    nodes = tree.body
    *outer, last = qualname.split(".")
    for name in outer:
        nodes = next((n.body for n in nodes if isinstance(n, ast.ClassDef) and n.name == name), [])
    return next((n for n in nodes
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == last), None)


def parse(path):
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        return source, ast.parse(source)
    except SyntaxError as e:
        raise ExerciseError(f"{path} does not parse (line {e.lineno}: {e.msg}); fix it, or take the original "
                            f"file back with: git checkout {os.path.basename(path)}")


def body_start(lines, node):
    """1-based first line of the body to replace: after the docstring if there is one, else after the
    header."""
    if node.body and isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None),
                                                                        ast.Constant) \
            and isinstance(node.body[0].value.value, str):
        return node.body[0].end_lineno + 1
    # the header may span lines (long signatures): its end is the first ':' outside brackets after `def`
    depth, readline = 0, iter(lines[node.lineno - 1:]).__next__
    for tok in tokenize.generate_tokens(readline):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.OP and tok.string == ":" and depth == 0:
            return node.lineno + tok.start[0]
    raise ExerciseError(f"cannot find the end of {node.name}'s signature")


def locate(root, lesson):
    """-> (lines of the file, FunctionDef). Lines keep their line endings."""
    path = os.path.join(root, lesson.file)
    source, tree = parse(path)
    node = find(tree, lesson.qualname)
    if node is None:
        raise ExerciseError(f"{lesson.qualname} is not in {lesson.file}")
    return source.splitlines(keepends=True), node


def function_text(lines, node):
    """The function from its `def` line to its last line (decorators stay where they are)."""
    return "".join(lines[node.lineno - 1:node.end_lineno])


def stub_line(lesson, node):
    indent = " " * (node.body[-1].col_offset if node.body else node.col_offset + 4)
    return indent + STUB.format(name=lesson.name) + "\n"


def is_blank(lines, node, lesson):
    return "".join(lines[body_start(lines, node) - 1:node.end_lineno]) == stub_line(lesson, node)


def write(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # atomic: an interrupted rewrite never leaves half a file


def saved_path(root, name, suffix=".py"):
    return os.path.join(root, SAVED, name + suffix)


def lesson_of(name):
    if name not in BY_NAME:
        raise ExerciseError(f"no lesson {name!r}; `python tests/exercises.py list` shows them")
    return BY_NAME[name]


def blank(root, names):
    """Replace each function's body with the stub; the original function goes to .exercises/NAME.py."""
    for lesson in map(lesson_of, names):
        lines, node = locate(root, lesson)
        if is_blank(lines, node, lesson):
            print(f"{lesson.name}: already blank")
            continue
        keep = saved_path(root, lesson.name)
        # the function holds something else now (a student's answer?): keep both safe
        if os.path.exists(keep):
            raise ExerciseError(f"{lesson.name}: {keep} already holds a saved original; restore it first "
                                f"(python tests/exercises.py restore {lesson.name})")
        os.makedirs(os.path.dirname(keep), exist_ok=True)
        write(keep, function_text(lines, node))
        start = body_start(lines, node)
        write(os.path.join(root, lesson.file),
              "".join(lines[:start - 1] + [stub_line(lesson, node)] + lines[node.end_lineno:]))
        print(f"{lesson.name}: blanked {lesson.file}:{lesson.qualname} "
              f"(original in {SAVED}/{lesson.name}.py); grade with: python -m pytest -m {lesson.name}")


def original_from_git(root, lesson):
    try:
        source = subprocess.run(["git", "show", f"HEAD:{lesson.file}"], cwd=root, capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    node = find(ast.parse(source), lesson.qualname)
    return function_text(source.splitlines(keepends=True), node) if node else None


def restore(root, names):
    """Put each original back: from .exercises/NAME.py, else from git HEAD. A student's version is kept."""
    for lesson in map(lesson_of, names):
        lines, node = locate(root, lesson)
        keep = saved_path(root, lesson.name)
        if os.path.exists(keep):
            with open(keep, encoding="utf-8") as f:
                original, source = f.read(), f"{SAVED}/{lesson.name}.py"
        else:
            original, source = original_from_git(root, lesson), "git HEAD"
            if original is None:
                raise ExerciseError(f"{lesson.name}: no saved copy in {SAVED}/ and no {lesson.qualname} "
                                    f"in git HEAD:{lesson.file}; nothing to restore from")
        current = function_text(lines, node)
        if current != original:
            if not is_blank(lines, node, lesson):  # someone wrote an answer: never throw it away
                n = 1
                while os.path.exists(yours := saved_path(root, lesson.name,
                                                         f".yours{'' if n == 1 else n}.py")):
                    n += 1
                write(yours, current)
                print(f"{lesson.name}: your version is kept in {os.path.relpath(yours, root)}")
            write(os.path.join(root, lesson.file),
                  "".join(lines[:node.lineno - 1]) + original + "".join(lines[node.end_lineno:]))
        if os.path.exists(keep):
            os.remove(keep)
            if not os.listdir(os.path.dirname(keep)):
                os.rmdir(os.path.dirname(keep))
        print(f"{lesson.name}: restored {lesson.file}:{lesson.qualname} from {source}")


def marked_tests(root):
    """{marker: number of test functions in tests/ decorated with @pytest.mark.<marker>}."""
    counts = {}
    tests = os.path.join(root, "tests")
    for fname in sorted(os.listdir(tests)):
        if fname.startswith("test_") and fname.endswith(".py"):
            _, tree = parse(os.path.join(tests, fname))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                    for d in node.decorator_list:
                        if isinstance(d, ast.Attribute) and isinstance(d.value, ast.Attribute) \
                                and d.value.attr == "mark":
                            counts[d.attr] = counts.get(d.attr, 0) + 1
    return counts


def status(root, lesson):
    """'blank', 'written' (present, not blank) or 'absent' (not in this version of the file)."""
    source, tree = parse(os.path.join(root, lesson.file))
    node = find(tree, lesson.qualname)
    if node is None:
        return "absent"
    return "blank" if is_blank(source.splitlines(keepends=True), node, lesson) else "written"


def show(root):
    counts = marked_tests(root)
    print("lesson = pytest marker   where                                tests  "
          "what it computes (graded against)")
    for lesson in LESSONS:
        state = status(root, lesson)
        note = {"blank": "  [BLANK]", "absent": "  [not in this version]", "written": ""}[state]
        where = f"{lesson.file}:{lesson.qualname}"
        print(f"{lesson.name:24s} {where:38s} {counts.get(lesson.name, 0):5d}  {lesson.summary}{note}")


def main(argv=None, root=ROOT):
    p = argparse.ArgumentParser(description="Blank lesson functions for students, grade them with "
                                "pytest -m NAME, restore them.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list",
                   help="lesson names (= pytest markers), where they live, their tests, one line each")
    for cmd, what in (("blank", "replace the bodies with raise NotImplementedError"),
                      ("restore", "put the originals back (a student's version is kept in .exercises/)")):
        sp = sub.add_parser(cmd, help=what)
        sp.add_argument("names", nargs="*", metavar="NAME", help="lesson names (see `list`)")
        sp.add_argument("--all", action="store_true", help="every lesson present in this version")
    args = p.parse_args(argv)
    try:
        if args.cmd == "list":
            return show(root)
        names = [les.name for les in LESSONS if status(root, les) != "absent"] if args.all else args.names
        # only the blanked or saved ones; untouched functions stay as they are
        if args.all and args.cmd == "restore":
            names = [n for n in names
                     if status(root, BY_NAME[n]) == "blank" or os.path.exists(saved_path(root, n))]
        if not names and args.all:
            return print(f"{args.cmd} --all: nothing to do")
        if not names:
            p.error(f"{args.cmd}: name at least one lesson, or --all")
        (blank if args.cmd == "blank" else restore)(root, names)
    except ExerciseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
