"""Classroom kit: take the heart of a lesson out of the code, have students write it back, grade it with its
tests.

  python tests/exercises.py list                        # lesson functions, their markers, one line each
  python tests/exercises.py blank apply_rope inner_loop # bodies -> raise NotImplementedError("exercise: ...")
  python -m pytest -m apply_rope                        # grade: its tests, against independent computations
  python tests/exercises.py restore apply_rope          # the original back (`restore --all` for every one)
  python tests/exercises.py handout rms_norm apply_rope --out lab/   # a student copy without the answers
  python tests/exercises.py grade submissions/ --csv grades.csv      # what was handed out: student x lesson

`blank` keeps the signature, decorators and docstring, and saves the original function in .exercises/NAME.py;
`restore` puts it back from there, or from git (HEAD) when there is no saved copy, and keeps what a student
wrote in .exercises/NAME.yours.py. Every other test that needs a blanked function is skipped with a message
naming it (tests/conftest.py), so a half-done exercise reports what is missing instead of dozens of unrelated
failures.
`handout` writes a fresh copy of the project with those lessons blank, a LAB.md for the student, and a new git
repository whose only commit is that copy: no saved original, no history, not the kit's own test (its planted
bugs quote the originals) and not the teacher's sections of the README; it records the lessons it blanked in
.exercises/handout.json. `grade` takes a folder of submissions (one sub-folder per student: a whole copy, or
just the student's maml_gpt.py) and grades the recorded lessons (or --lessons), each in isolation: the
student's file with every *other* lesson function put back to the reference, the teacher's tests, one
subprocess per student and lesson with a time limit, so an infinite loop costs only its own cell. A cell is
passed, failed, blank (left as handed out), not handed in (no such file), or error (a file that does not parse
or import is error in every lesson it holds).
Plain text and `ast`: no import of the code under exercise, so it works even when that code is broken.
"""
import argparse
import ast
import concurrent.futures
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import tokenize
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = ".exercises"  # saved originals (NAME.py) and students' versions (NAME.yours.py), under the repo root
RECORD = os.path.join(SAVED, "handout.json")  # the lessons the last hand-out blanked: what `grade` grades


@dataclass(frozen=True)
class Lesson:
    name: str  # the CLI name and the pytest marker of the tests that grade it
    file: str  # relative to the repository root
    qualname: str  # a function, or Class.method
    summary: str
    hint: str = ""  # one hint for the hand-out (LAB.md): the idea, not the code
    needs: tuple = ()  # lessons whose ideas this one builds on (the lab's order); never needed to grade it


# In the paper's order. Every marker's tests compare the function with an independent computation (the
# formula, numpy, hand-written loops, hand-worked cases), never with the project's own code path.
LESSONS = [
    Lesson("rms_norm", "maml_gpt.py", "RMSNorm.forward",
           "x / sqrt(mean(x^2) + eps) * gain, in fp32 (vs the formula)",
           hint="the mean is over the last (feature) dimension, eps goes inside the square root, and the "
                "arithmetic is fp32 whatever x's dtype: cast back to x's dtype before the gain"),
    Lesson("apply_rope", "maml_gpt.py", "apply_rope", "rotate adjacent feature pairs by t * theta^(-2i/d) "
           "(vs complex multiplication)",
           hint="pair feature 2i with 2i+1 (not i with i + d/2); pair i at position t turns by the angle "
                "whose cos and sin are cos[t, i], sin[t, i], counter-clockwise, like multiplying "
                "x_2i + i x_2i+1 by e^(i angle); the arithmetic in fp32, the result in x's dtype"),
    Lesson("attention", "maml_gpt.py", "Attention.forward",
           "causal attention, 12 query heads sharing 4 kv heads "
           "(vs explicit softmax with repeated kv heads)",
           hint="self.qkv gives q (B, 12, T, hd) and k, v (B, 4, T, hd); query heads 0-2 share kv head 0, "
                "3-5 kv head 1 (h // 3, not h % 4); position t sees positions 0..t; scale by 1/sqrt(hd)",
           needs=("apply_rope",)),
    Lesson("sample_episode", "maml_gpt.py", "sample_episode",
           "an SMLMT episode: N words, K support + Q query masked contexts (vs its invariants)",
           hint="everything random comes from np.random.default_rng(key); draw a word's K+Q occurrences in "
                "one draw without replacement, then split them (drawing support and query separately lets a "
                "query repeat a support example); classes[label] is the word, so invert the label "
                "permutation"),
    Lesson("episode_init", "maml_gpt.py", "episode_init",
           "Proto-MAML head init: W = 2 mu, b = -||mu||^2 from support class means (vs the formula)",
           hint="mu_c is the mean over class c's support rows of the body's output (the layer-3 activations, "
                "not the raw features); with W = 2 mu and b = -||mu||^2 the logits are -||z - mu_c||^2 plus "
                "a per-row constant (tied=True: out.proto = mu itself). Keep the graph: the meta-gradient "
                "reaches the body through mu"),
    Lesson("inner_loop", "maml_gpt.py", "inner_loop",
           "first-order inner loop: SGD of the head on the support set, a step per layer group, "
           "backtracking, no host sync (vs hand-written SGD)",
           hint="step one fresh flat vector of the moving weights (torch.cat of phi0's values) with "
                "torch.autograd.grad (never .backward()); nothing may link one step to the next (first "
                "order); lr is one float or a step per layer group (body, out), a group that is 0 or missing "
                "staying as it is; backtracking chooses with torch.where, never a Python if on a tensor; the "
                "result has the adapted values but hands its gradient straight to phi0",
           needs=("episode_init",)),
    Lesson("meta_micro_step", "maml_gpt.py", "meta_micro_step",
           "one episode's gradient routing: query only, into backbone and head init "
           "(vs a manual computation)",
           hint="support features without a graph (they only build the head), query features with one; one "
                "backward of loss * scale, so that micro-steps and ranks sum to a mean",
           needs=("episode_init", "inner_loop")),
    Lesson("effective_rank", "maml_gpt.py", "effective_rank",
           "exp(entropy of sigma / sum sigma), the basis of PER (vs numpy's SVD)",
           hint="the distribution is sigma / sum(sigma) (singular values, not their squares); 0 log 0 = 0"),
    Lesson("attention_entropy", "maml_gpt.py", "attention_entropy", "per-head entropy of causal attention "
           "(vs log(t+1) for uniform, explicit softmax)",
           hint="rebuild each layer's probabilities from attention.qkv (kv head h // 3 for query head h), "
                "entropy over keys, mean over batch and query positions; the next layer's input is the real "
                "block's output",
           needs=("attention",)),
    Lesson("lm_loss", "maml_gpt.py", "_chunked_linear_ce", "fused, chunked LM head + cross-entropy and both "
           "gradients, without the (N, V) logits (vs F.cross_entropy on full logits)",
           hint="per chunk of rows: logits, minus their row max, loss = log(sum exp) - target logit; "
                "d loss / d logits = softmax - one_hot(target), zero on ignored rows; then two matmuls"),
    Lesson("entity_f1", "finetune_ner.py", "entity_f1",
           "exact-span entity precision / recall / F1, seqeval's rules (vs hand-worked cases)",
           hint="an entity is (sentence, type, start, end); a hit needs all four equal; precision divides by "
                "the predicted entities, recall by the gold ones"),
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


# ------------------------------------------------------------------------------------------------------------
# Hand-outs and grading a class

# Never in a student's copy: the kit's own test (its planted bugs quote the original code), the answer
# key, the teacher's lab plan, and the saved originals.
TEACHER_ONLY = ("tests/test_exercises.py", "tests/answer_key.py", "LAB.md")
SKIP_DIRS = {".git", SAVED, "__pycache__", ".pytest_cache", "out", "cache", ".venv", "venv"}
HOT_PATH = "test_hot_path.py"  # a lesson's rules of speed (no host sync, few ops), graded after its maths
TEACHER_SECTION = "## For teachers"  # README sections from here to the next "## " stay with the teacher


def project_files(root):
    """Relative paths of the project's files: git's tracked and not-ignored ones, or (no repository) a walk
    that leaves out caches, runs and the saved originals."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.splitlines()
        if out and subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True,
                                  text=True).stdout.strip() == os.path.realpath(root):
            return sorted(f for f in out if os.path.isfile(os.path.join(root, f))
                          and not f.startswith(SAVED + "/"))
    except (OSError, subprocess.CalledProcessError):
        pass
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        files += [os.path.relpath(os.path.join(d, n), root) for n in names
                  if not n.endswith((".pyc", ".tmp"))]
    return sorted(files)


def splice(source, texts, tree=None):
    """`source` with each function named in `texts` ({qualname: text from `def` to its end}) replaced; one
    parse (`tree`, if given, is that of `source`), replacements from the bottom up."""
    lines, tree = source.splitlines(keepends=True), tree or ast.parse(source)
    nodes = sorted(((find(tree, q), t) for q, t in texts.items()), key=lambda nt: -nt[0].lineno)
    for node, text in nodes:
        lines[node.lineno - 1:node.end_lineno] = [text]
    return "".join(lines)


def reference_source(root, file):
    """The text of `file` in `root` with every lesson function the original: from .exercises/NAME.py if it
    was saved there, from git HEAD if it is blank, else as it is. `root` itself is never modified."""
    with open(os.path.join(root, file), encoding="utf-8") as f:
        source = f.read()
    tree, lines, originals = ast.parse(source), source.splitlines(keepends=True), {}
    for lesson in LESSONS:
        node = find(tree, lesson.qualname) if lesson.file == file else None
        if node is None:
            continue
        keep = saved_path(root, lesson.name)
        if os.path.exists(keep):
            with open(keep, encoding="utf-8") as f:
                originals[lesson.qualname] = f.read()
        elif is_blank(lines, node, lesson):
            originals[lesson.qualname] = original_from_git(root, lesson)
            if originals[lesson.qualname] is None:
                raise ExerciseError(f"{lesson.name} is blank in {root} and there is no original to take "
                                    f"(no {SAVED}/{lesson.name}.py, no git HEAD); restore it first")
    return splice(source, originals, tree) if originals else source


def strip_teacher_sections(readme):
    """The README without the teacher's sections (the answer key among them), pointing to LAB.md instead."""
    out, skipping = [], False
    for line in readme.splitlines(keepends=True):
        if line.startswith("## "):
            skipping = line.startswith(TEACHER_SECTION)
            if skipping:
                out.append("## Lab\n\nYour exercises, and how they are graded, are in [LAB.md](LAB.md).\n\n")
        if not skipping:
            out.append(line)
    return re.sub(r"\[For teachers\]\(#for-teachers[\w-]*\)", "[LAB.md](LAB.md)", "".join(out))


def student_lab(root, lessons):
    """LAB.md of a hand-out: what to write, where, the contract, one hint, how to grade."""
    names = [les.name for les in lessons]
    text = ["# Lab: write these functions back\n\n",
            "In this copy of maml-gpt the bodies of the functions below are missing: each raises "
            "`NotImplementedError(\"exercise: ...\")`. Write each one back. Its docstring is the contract "
            "(shapes, dtypes, conventions, errors); the README's \"How it works\" and the paper "
            "(arXiv 2508.02189) explain the ideas. Do not change signatures.\n\n",
            "Grade yourself as often as you like (the tests compare your function with an independent "
            "computation, and a failure says which idea broke):\n\n",
            "```bash\npython -m pytest -q -m " + names[0] + "            # one lesson\n"
            + "python -m pytest -q -m \"" + " or ".join(names) + "\"   # all of them\n"
            + "python tests/exercises.py list                  # [BLANK] marks what is still to do\n```\n\n",
            "While a function is blank, other tests that need it are skipped with a note, not failed. "
            "This folder is a git repository with one commit: `git diff` shows what you wrote. To hand in, "
            "give your teacher the folder (or just the files you changed).\n\n",
            "| lesson (`-m`) | function | what it computes | builds on | quickest grading |\n"
            "|---|---|---|---|---|\n"]
    text += [f"| `{les.name}` | `{les.file}:{les.qualname}` | {les.summary} | "
             f"{', '.join(les.needs) or '-'} | `python -m pytest -q -m {les.name} "
             f"{' '.join(marker_files(root, les.name))}` |\n" for les in lessons]
    text.append("\n## Hints (one per lesson)\n\n")
    text += [f"- **{les.name}**: {les.hint}.\n" for les in lessons]
    return "".join(text)


def handout(root, names, out):
    """A student copy of the project in `out`: those lessons blank, nothing that holds their originals."""
    lessons = list(dict.fromkeys(map(lesson_of, names)))
    if os.path.exists(out) and os.listdir(out):
        raise ExerciseError(f"{out} exists and is not empty; give handout a new folder")
    files = [f for f in project_files(root) if f not in TEACHER_ONLY]
    os.makedirs(out, exist_ok=True)
    lesson_files = {les.file for les in LESSONS}
    for f in files:
        dst = os.path.join(out, f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if f in lesson_files:
            write(dst, reference_source(root, f))
        elif f == "README.md":
            with open(os.path.join(root, f), encoding="utf-8") as fh:
                write(dst, strip_teacher_sections(fh.read()))
        else:
            shutil.copy2(os.path.join(root, f), dst)
    for les in lessons:
        if status(out, les) == "absent":
            raise ExerciseError(f"{les.name}: {les.qualname} is not in {les.file}")
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            blank(out, [les.name for les in lessons])
        finally:
            sys.stdout = stdout
    shutil.rmtree(os.path.join(out, SAVED))  # the originals blank() saved: the answers
    write(os.path.join(out, "LAB.md"), student_lab(out, lessons))
    git = shutil.which("git")
    if git:  # a fresh repository: its only objects are this blank copy
        env = dict(os.environ, GIT_AUTHOR_NAME="lab", GIT_AUTHOR_EMAIL="lab@example.org",
                   GIT_COMMITTER_NAME="lab", GIT_COMMITTER_EMAIL="lab@example.org")
        for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "lab hand-out"]):
            subprocess.run([git, *cmd], cwd=out, env=env, check=True, capture_output=True)
    # The record `grade` reads: what was blanked, and each lesson file as handed out (a file handed back
    # unchanged is blank in every lesson, known to import, and needs no grading run).
    files = {f: file_hash(os.path.join(out, f)) for f in {les.file for les in lessons}}
    os.makedirs(os.path.join(root, SAVED), exist_ok=True)
    write(os.path.join(root, RECORD), json.dumps(dict(folder=os.path.abspath(out), lessons=[les.name for les
                                                                                           in lessons],
                                                      files=files), indent=1) + "\n")
    print(f"hand-out in {out}: {', '.join(les.name for les in lessons)} blank; LAB.md says what to do"
          f"{'; a fresh git repository with one commit' if git else ' (git not found: no repository)'}; "
          f"`grade` grades these lessons by default (recorded in {RECORD})")


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def handout_record(root):
    """The last hand-out's record ({"folder", "lessons", "files": {file: sha256}}), or None."""
    path = os.path.join(root, RECORD)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def marker_files(root, name):
    """The test files (relative to root) that hold tests marked with this lesson; the hot path's last, so that
    the first failure of a wrong formula is a check of the formula."""
    tests = os.path.join(root, "tests")
    return [os.path.join("tests", f) for f in sorted(os.listdir(tests), key=lambda f: (f == HOT_PATH, f))
            if f.startswith("test_") and f.endswith(".py")
            and f"@pytest.mark.{name}\n" in open(os.path.join(tests, f), encoding="utf-8").read()]


class Recorder:
    """pytest plugin: per test, "passed" / "failed" / "skipped: reason", and the first line of each failure's
    message; collection errors as "error". A failure in any phase counts."""

    def __init__(self, threads=None):
        self.outcomes, self.messages, self.errors, self.threads = {}, {}, [], threads

    def pytest_sessionstart(self, session):
        if self.threads:
            import torch
            torch.set_num_threads(self.threads)  # after conftest's 2: a spinning second thread is slow here

    def pytest_collectreport(self, report):
        if report.failed:
            self.errors.append(first_error_line(str(report.longrepr)))

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or not report.passed:
            if self.outcomes.get(report.nodeid) != "failed":
                self.outcomes[report.nodeid] = report.outcome if not report.skipped else (
                    "skipped: "
                    f"{report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr}")
            if report.failed and report.nodeid not in self.messages:
                crash = getattr(report.longrepr, "reprcrash", None)
                text = crash.message if crash else str(report.longrepr)
                line = text.strip().splitlines()[0] if text.strip() else "failed"
                self.messages[report.nodeid] = re.sub(r"^(Failed|AssertionError): ", "", line)


def first_error_line(text):
    """The exception of a pytest error report: its last 'E   ...' line block's first line."""
    lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
    for i, ln in enumerate(lines):  # the exception class line, e.g. "ModuleNotFoundError: No module named x"
        if re.match(r"\w+(Error|Exception)\b", ln):
            return ln
    return lines[-1] if lines else (text.strip().splitlines() or ["error"])[-1]


def run_graded(argv):
    """In a grading subprocess: pytest on argv[1:], results as JSON in argv[0]."""
    import pytest
    rec = Recorder(threads=1)
    # no:unraisableexception: its gc.collect() calls per session cost more than a lesson's tests
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception", *argv[1:]],
                       plugins=[rec])
    with open(argv[0], "w") as f:
        json.dump(dict(code=int(code), outcomes=rec.outcomes, messages=rec.messages, errors=rec.errors), f)
    return 0


def grading_command(tree, lesson, result):
    """The subprocess that grades one lesson in `tree` (the teacher's tests, the student's function); it stops
    at the first failure, the check a cell reports."""
    driver = "import sys, exercises; sys.exit(exercises.run_graded(sys.argv[1:]))"
    return [sys.executable, "-c", driver, result, "-m", lesson.name, "--maxfail=1", "--rootdir", tree,
            *[os.path.join(tree, f) for f in marker_files(tree, lesson.name)]]


def student_file(folder, file):
    """A student's copy of `file`: in their folder, or (one level of unpacking) in its only sub-folder."""
    direct = os.path.join(folder, file)
    if os.path.isfile(direct):
        return direct
    nested = [os.path.join(folder, d, file) for d in sorted(os.listdir(folder))
              if os.path.isfile(os.path.join(folder, d, file))]
    return nested[0] if len(nested) == 1 else None


def prepare(student, folder, lesson, reference, work):
    """Either a verdict (status, message) without running anything, or the grading tree for this student and
    lesson: the reference project with lesson.file = the student's file, every other lesson in it the
    reference's."""
    path = student_file(folder, lesson.file)
    if path is None:
        return ("not handed in", f"no {lesson.file} in {student}/")
    with open(path, encoding="utf-8", errors="replace") as f:
        source = f.read()
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return ("error", f"{lesson.file} does not parse (line {e.lineno}: {e.msg})")
    node = find(tree, lesson.qualname)
    if node is None:
        return ("error", f"{lesson.file} has no {lesson.qualname}")
    lines = source.splitlines(keepends=True)
    if is_blank(lines, node, lesson):
        return ("blank", "")
    ref, ref_tree = reference[lesson.file], reference["<ast>"][lesson.file]
    ref_lines = ref.splitlines(keepends=True)
    if function_text(lines, node) == function_text(ref_lines, find(ref_tree, lesson.qualname)):
        return ("passed", "the reference function, unchanged")
    # the other lessons of this file: the reference's, so that each lesson is graded alone
    others = {o.qualname: function_text(ref_lines, find(ref_tree, o.qualname)) for o in LESSONS
              if o is not lesson and o.file == lesson.file
              and find(tree, o.qualname) and find(ref_tree, o.qualname)}
    source = splice(source, others, tree)
    dst = os.path.join(work, re.sub(r"\W", "_", student), lesson.name)
    shutil.copytree(reference["<tree>"], dst, symlinks=True)
    write(os.path.join(dst, lesson.file), source)
    return dst


def import_error(student, folder, file, reference, work, timeout):
    """None if the student's `file`, as handed in (blank lessons and all), imports in the reference project;
    else why not, in the words of a grading run's verdict."""
    dst = os.path.join(work, re.sub(r"\W", "_", student), "import-" + file)
    shutil.copytree(reference["<tree>"], dst, symlinks=True)
    shutil.copyfile(student_file(folder, file), os.path.join(dst, file))
    code, output = run_one([sys.executable, "-c", f"import {file[:-3].replace('/', '.')}"], dst, timeout)
    if code == 0:
        return None
    if code is None:
        return f"importing it ran past the time limit of {timeout:g} s"
    return f"does not import: {(output.strip().splitlines() or ['exit ' + str(code)])[-1][:200]}"


def run_one(cmd, cwd, timeout):
    """-> (return code or None on timeout, output). The whole process group goes on a timeout."""
    env = dict(os.environ, PYTHONPATH=os.path.join(cwd, "tests"), PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, ""


def verdict(result_path, code, output, timeout):
    """(status, message) of one grading subprocess."""
    if code is None:
        return ("error", f"ran past the time limit of {timeout:g} s (an infinite loop?)")
    if not os.path.exists(result_path):
        return ("error", f"the grading process died (exit {code}): "
                         f"{(output.strip().splitlines() or [''])[-1][:200]}")
    with open(result_path) as f:
        r = json.load(f)
    failed = [t for t, o in r["outcomes"].items() if o == "failed"]
    if r["errors"] and not r["outcomes"]:
        return ("error", f"does not import: {r['errors'][0]}")
    if failed:
        return ("failed", f"{failed[0].split('::')[-1]}: {r['messages'].get(failed[0], 'failed')}")
    if not r["outcomes"]:
        return ("error", f"no test ran (pytest exit {r['code']})")
    if any(o != "passed" for o in r["outcomes"].values()):
        return ("error", f"tests skipped: {next(o for o in r['outcomes'].values() if o != 'passed')}")
    return ("passed", f"{len(r['outcomes'])} tests")


def grade(root, submissions, names, csv_path=None, timeout=120.0, jobs=2):
    """Grade every student folder in `submissions` on each lesson; print the table, write the CSV."""
    if not os.path.isdir(submissions):
        raise ExerciseError(f"{submissions} is not a folder of submissions (one sub-folder per student)")
    students = sorted(d for d in os.listdir(submissions)
                      if os.path.isdir(os.path.join(submissions, d)) and not d.startswith("."))
    if not students:
        raise ExerciseError(f"{submissions} has no sub-folders: put each student's copy (or maml_gpt.py) in "
                            f"a folder of its own, named after the student")
    record = handout_record(root)
    if not names and record is None:
        raise ExerciseError(f"no hand-out is recorded in {RECORD} (`handout` records one): name the lessons "
                            f"to grade with --lessons")
    if not names:
        print(f"grading the lessons handed out in {record['folder']}: {', '.join(record['lessons'])} "
              f"(recorded in {RECORD}; --lessons grades others)")
    lessons = list(dict.fromkeys(map(lesson_of, names or record["lessons"])))
    # the files as handed out, when the lessons graded are those blanked in them
    handed = record["files"] if record and set(les.name for les in lessons) == set(record["lessons"]) else {}
    work = tempfile.mkdtemp(prefix="grade-")
    try:
        # The reference tree once: the teacher's code with the original lessons, the teacher's tests; its
        # data folder is shared by link (the tokenizer file is the only large thing).
        ref_tree = os.path.join(work, "reference")
        reference = {f: reference_source(root, f) for f in {les.file for les in LESSONS}
                     if os.path.exists(os.path.join(root, f))}
        for f in project_files(root):
            if f in TEACHER_ONLY or f.startswith("data/"):
                continue  # not the kit's own test: it grades the kit, not a student
            dst = os.path.join(ref_tree, f)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if f in reference:
                write(dst, reference[f])
            else:
                shutil.copy2(os.path.join(root, f), dst)
        os.symlink(os.path.join(os.path.abspath(root), "data"), os.path.join(ref_tree, "data"))
        reference["<tree>"] = ref_tree
        reference["<ast>"] = {f: ast.parse(text) for f, text in reference.items() if not f.startswith("<")}

        def one(student, lesson):  # -> (status, message, whether a grading run imported the file)
            got = prepare(student, os.path.join(submissions, student), lesson, reference, work)
            if isinstance(got, tuple):
                return (*got, False)
            result = os.path.join(got, "result.json")
            code, output = run_one(grading_command(got, lesson, result), got, timeout)
            return (*verdict(result, code, output, timeout), True)

        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
            cells = {(s, les.name): pool.submit(one, s, les) for s in students for les in lessons}
            cells = {key: cell.result() for key, cell in cells.items()}
        # A file that does not import is `error` in every lesson it holds, the blank ones too: its grading
        # runs say so, or (none ran, none is an error: all blank) an import of it, unless it is as handed out.
        for s in students:
            folder = os.path.join(submissions, s)
            for f in dict.fromkeys(les.file for les in lessons):
                mine = [les.name for les in lessons
                        if les.file == f and cells[s, les.name][0] != "not handed in"]
                said = [cells[s, n] for n in mine]
                broken = next((msg for _, msg, _ in said if msg.startswith("does not import")), None)
                if said and broken is None and not any(ran or st == "error" for st, _, ran in said) \
                        and file_hash(student_file(folder, f)) != handed.get(f):
                    broken = import_error(s, folder, f, reference, work, timeout)
                for n in mine if broken else ():
                    cells[s, n] = ("error", broken, True)
        rows = [(s, les.name, *cells[s, les.name][:2]) for s in students for les in lessons]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    width = max(len(s) for s in students + ["student"])
    cols = [max([len(les.name)] + [len(st) for _, n, st, _ in rows if n == les.name]) for les in lessons]
    print(f"{'student':{width}s}  " + "  ".join(f"{les.name:{w}s}" for les, w in zip(lessons, cols))
          + "  passed")
    by = {(s, les): (st, msg) for s, les, st, msg in rows}
    for s in students:
        got = [by[s, les.name][0] for les in lessons]
        print(f"{s:{width}s}  " + "  ".join(f"{g:{w}s}" for g, w in zip(got, cols))
              + f"  {got.count('passed')}/{len(lessons)}")
    notes = [(s, les, st, msg) for s, les, st, msg in rows if st in ("failed", "error")]
    if notes:
        print()
    for s, les, st, msg in notes:
        print(f"{s} / {les}: {st}: {msg}")
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["student", "lesson", "status", "message"])
            w.writerows(rows)
        print(f"\n{len(rows)} rows in {csv_path}")
    return rows


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
    sp = sub.add_parser("handout", help="a student copy with those lessons blank and no trace of them")
    sp.add_argument("names", nargs="+", metavar="NAME", help="lesson names (see `list`)")
    sp.add_argument("--out", required=True, help="a new (or empty) folder for the copy")
    sp = sub.add_parser("grade", help="grade a folder of submissions: a student x lesson table")
    sp.add_argument("submissions", help="one sub-folder per student: their copy, or just their maml_gpt.py")
    sp.add_argument("--lessons", nargs="+", metavar="NAME",
                    help=f"the lessons to grade (default: those the last hand-out blanked, in {RECORD})")
    sp.add_argument("--csv", help="also write student,lesson,status,message rows here")
    sp.add_argument("--timeout", type=float, default=120.0, help="seconds per student and lesson")
    sp.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="gradings run at the same time")
    args = p.parse_args(argv)
    try:
        if args.cmd == "list":
            return show(root)
        if args.cmd == "handout":
            return handout(root, args.names, args.out)
        if args.cmd == "grade":
            grade(root, args.submissions, args.lessons, args.csv, args.timeout, args.jobs)
            return None
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
    try:
        sys.exit(main())
    except BrokenPipeError:  # `list | head` closed the pipe: nothing is lost, and no traceback is due
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
