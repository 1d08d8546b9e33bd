"""The classroom kit (tests/exercises.py): blank, restore and list, and the grading itself. In a copy of the
repository, every lesson's marker tests all fail on a blank body, catch each planted wrong version, and pass
again once it is restored; a blanked function skips the tests that merely depend on it."""
import ast
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

import exercises as kit

# Plausible wrong versions, at least one per lesson: description -> [(original snippet, wrong snippet), ...],
# applied in order inside the function. The lesson's marker tests must fail on every one of them.
PLANTS = {
    "rms_norm": {
        "sum of squares instead of their mean": [("xf.pow(2).mean(-1", "xf.pow(2).sum(-1")],
        "no learned gain": [(".type_as(x) * self.weight", ".type_as(x)")],
    },
    "apply_rope": {
        "rotate-half pairing (x_i, x_i+d/2), HF's convention": [
            ("x.float().unflatten(-1, (-1, 2)).unbind(-1)", "x.float().chunk(2, -1)"),
            ("x1 * cos), dim=-1)", "x1 * cos), dim=-1).transpose(-1, -2)")],
        "sign flip: rotation by minus the angle": [
            ("x0 * cos - x1 * sin, x0 * sin + x1 * cos", "x0 * cos + x1 * sin, -x0 * sin + x1 * cos")],
    },
    "attention": {
        "no causal mask": [("is_causal=True, enable_gqa=True", "is_causal=False, enable_gqa=True")],
        "kv heads tiled, not grouped (query head h reads kv head h % 4)": [
            ("(q, k, v, is_causal=True, enable_gqa=True)",
             "(q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1), is_causal=True)")],
    },
    "sample_episode": {
        "classes not inverted: classes[c] is not label c's word": [
            ('classes[labels] = index["words"][chosen]', 'classes[:] = index["words"][chosen]')],
        "[MASK] one token before the window's end": [
            ("mask_at = np.full(occ.shape, ctx - 1)", "mask_at = np.full(occ.shape, ctx - 2)")],
        "support and query drawn separately (a query can repeat a support occurrence)": [
            ("rng.choice(counts[w], per_class, replace=False)",
             "np.concatenate([rng.choice(counts[w], k_shot, replace=False), "
             "rng.choice(counts[w], q_query, replace=False)])")],
    },
    "episode_init": {
        "sign flip in the bias: +||mu||^2": [("-(mu * mu).sum(-1)", "(mu * mu).sum(-1)")],
        "class sums instead of class means": [
            ("mu = mu / count[:, None]", "mu = mu * 1")],
    },
    "inner_loop": {
        "gradient ascent: w + lr * grad": [
            ("theta = theta - rate * grad", "theta = theta + rate * grad")],
        "phi_T returned without its path to phi_0 (no meta-gradient)": [
            ("return {k: p + (fast[k] - p).detach() for k, p in phi0.items()}", "return fast")],
        "second order: create_graph=True and no detach, the graph runs through every step": [
            ("torch.cat([phi0[k].detach().reshape(-1) for k in moving])",
             "torch.cat([phi0[k].reshape(-1) for k in moving])"),
            ("torch.autograd.grad(loss, theta)", "torch.autograd.grad(loss, theta, create_graph=True)"),
            ("theta, loss = theta.detach(), loss.detach()", "loss = loss.detach()"),
            ("return {k: p + (fast[k] - p).detach() for k, p in phi0.items()}", "return fast")],
    },
    "meta_micro_step": {
        "support features computed with a graph": [("with torch.no_grad(), amp:", "with amp:")],
        "micro-step scale ignored": [("(loss * scale).backward()", "loss.backward()")],
    },
    "effective_rank": {
        "entropy of sigma^2 / sum sigma^2 (energy)": [
            ("svdvals(W.detach().float())", "svdvals(W.detach().float()) ** 2")],
        "mean instead of sum in the normaliser": [("total = s.sum()", "total = s.mean()")],
    },
    "attention_entropy": {
        "mean over keys instead of sum": [("entr(probs).sum(-1)", "entr(probs).mean(-1)")],
        "kv heads tiled, not grouped": [
            ("k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)",
             "k.repeat(1, attn.n_heads // attn.n_kv_heads, 1, 1)")],
    },
    "lm_loss": {
        "log-sum-exp without the log": [("sum_e.log() - z_t", "sum_e - z_t")],
        "gradient is softmax only (one-hot forgotten)": [
            ("g.scatter_add_(1, safe_t[rows], -counted[rows, None].float())",
             "g.scatter_add_(1, safe_t[rows], 0 * counted[rows, None].float())")],
    },
    "entity_f1": {
        "precision and recall swapped": [
            ("pr = tp / len(ps) if ps else 0.0", "pr = tp / len(gs) if gs else 0.0"),
            ("rc = tp / len(gs) if gs else 0.0", "rc = tp / len(ps) if ps else 0.0")],
        "entities matched across sentences (no sentence index)": [
            ("g = {(s,) + e for", "g = {e for"), ("p = {(s,) + e for", "p = {e for")],
    },
}

# What the first failure must say about each plant: the grader names the idea, in the student's terms.
NAMES_THE_IDEA = {
    "sum of squares instead of their mean": "sum of squares",
    "no learned gain": "gain",
    "rotate-half pairing (x_i, x_i+d/2), HF's convention": "wrong feature pairs",
    "sign flip: rotation by minus the angle": "minus the angle",
    "no causal mask": "not causal",
    "kv heads tiled, not grouped (query head h reads kv head h % 4)": "h // 3",
    "classes not inverted: classes[c] is not label c's word": "invert the label permutation",
    "[MASK] one token before the window's end": "window's last token",
    "support and query drawn separately (a query can repeat a support occurrence)":
        "a query window repeats a support occurrence",
    "sign flip in the bias: +||mu||^2": "sign flip in the bias",
    "class sums instead of class means": "class sums",
    "gradient ascent: w + lr * grad": "gradient ascent",
    "phi_T returned without its path to phi_0 (no meta-gradient)": "no gradient path to phi_0",
    "second order: create_graph=True and no detach, the graph runs through every step":
        "the inner loop is second order",
    "support features computed with a graph": "gradient from the support set",
    "micro-step scale ignored": "scale is ignored",
    "entropy of sigma^2 / sum sigma^2 (energy)": "squares of the singular values",
    "mean instead of sum in the normaliser": "sum",
    "mean over keys instead of sum": "sum over keys",
    "kv heads tiled, not grouped": "h // 3",
    "log-sum-exp without the log": "forgets the log",
    "gradient is softmax only (one-hot forgotten)": "one-hot of the target is not subtracted",
    "precision and recall swapped": "swapped",
    "entities matched across sentences (no sentence index)": "different sentences",
}

PRESENT = [les for les in kit.LESSONS if kit.status(kit.ROOT, les) != "absent"]


def copy_repo(dst):
    """The code, data and tests (no caches, runs or virtual environments), with every lesson function
    original: these tests check the kit against the reference code, even while a class has some of it blank or
    rewritten."""
    os.makedirs(dst)
    for name in os.listdir(kit.ROOT):
        if name.endswith((".py", ".md")):
            shutil.copy2(os.path.join(kit.ROOT, name), dst)
    skip = shutil.ignore_patterns("__pycache__", "cache", "*.pyc", ".pytest_cache")
    for name in ("data", "tests", kit.SAVED):
        if os.path.isdir(os.path.join(kit.ROOT, name)):
            shutil.copytree(os.path.join(kit.ROOT, name), os.path.join(dst, name), ignore=skip)
    with contextlib.redirect_stdout(io.StringIO()):
        assert kit.main(["restore", "--all"], root=str(dst)) is None, \
            "cannot restore the original lesson functions"
    # students' versions stay in the real checkout
    shutil.rmtree(os.path.join(dst, kit.SAVED), ignore_errors=True)
    return str(dst)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("original") / "repo")


def planted(source, lesson, subs):
    """`source` with the substitutions applied inside the lesson's function (each must match exactly once
    there)."""
    lines = source.splitlines(keepends=True)
    node = kit.find(ast.parse(source), lesson.qualname)
    body = kit.function_text(lines, node)
    for old, new in subs:
        assert body.count(old) == 1, \
            f"{lesson.name}: {old!r} occurs {body.count(old)} times in {lesson.qualname}"
        body = body.replace(old, new)
    return "".join(lines[:node.lineno - 1]) + body + "".join(lines[node.end_lineno:])


@pytest.mark.parametrize("lesson", kit.LESSONS, ids=lambda les: les.name)
def test_every_lesson_has_tests_and_plants(lesson, pytestconfig, original):
    # registered: no warnings
    assert any(m.startswith(lesson.name + ":") for m in pytestconfig.getini("markers"))
    if lesson not in PRESENT:
        pytest.skip(f"{lesson.qualname} is not in {lesson.file} yet")
    assert kit.marked_tests(kit.ROOT).get(lesson.name, 0) >= 1, \
        f"no test is marked @pytest.mark.{lesson.name}"
    assert PLANTS.get(lesson.name), f"no planted wrong version of {lesson.name}"
    source = open(os.path.join(original, lesson.file)).read()
    for subs in PLANTS[lesson.name].values():
        compile(planted(source, lesson, subs), lesson.file, "exec")


def test_blank_keeps_signature_and_docstring_and_restore_is_exact(tmp_path, capsys):
    root = copy_repo(tmp_path / "repo")
    files = {f: open(os.path.join(root, f)).read() for f in {les.file for les in PRESENT}}
    kit.main(["blank"] + [les.name for les in PRESENT], root=root)
    for les in PRESENT:
        before = kit.find(ast.parse(files[les.file]), les.qualname)
        source = open(os.path.join(root, les.file)).read()
        after = kit.find(ast.parse(source), les.qualname)
        assert ast.dump(after.args) == ast.dump(before.args)
        assert [ast.dump(d) for d in after.decorator_list] == [ast.dump(d) for d in before.decorator_list]
        assert ast.get_docstring(after) == ast.get_docstring(before)
        raise_ = after.body[-1]
        assert (isinstance(raise_, ast.Raise)
                and len(after.body) == 1 + (ast.get_docstring(before) is not None))
        assert kit.BLANKED.search(ast.unparse(raise_)).group(1) == les.name
        assert kit.status(root, les) == "blank"
    assert kit.main(["blank", "rms_norm"], root=root) is None and "already blank" in capsys.readouterr().out
    # a student writes an answer, then the teacher restores: the original is back, the answer kept aside
    path = os.path.join(root, "maml_gpt.py")
    source = open(path).read()
    open(path, "w").write(source.replace(kit.STUB.format(name="apply_rope"), "return x  # my answer"))
    kit.main(["restore", "--all"], root=root)
    for f, text in files.items():
        assert open(os.path.join(root, f)).read() == text
    assert "return x  # my answer" in open(os.path.join(root, kit.SAVED, "apply_rope.yours.py")).read()
    assert "kept in .exercises/apply_rope.yours.py" in capsys.readouterr().out


def test_errors_are_one_clear_line(tmp_path, capsys):
    root = copy_repo(tmp_path / "repo")
    assert kit.main(["blank", "nope"], root=root) == 1
    assert capsys.readouterr().err.startswith("error: no lesson 'nope'")
    kit.main(["blank", "rms_norm"], root=root)
    path = os.path.join(root, "maml_gpt.py")
    open(path, "a").write("def broken(:\n")
    assert kit.main(["restore", "rms_norm"], root=root) == 1
    assert "does not parse (line" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_restore_from_git_without_a_saved_copy(tmp_path):
    root = copy_repo(tmp_path / "repo")
    git = lambda *a: subprocess.run(["git", *a], cwd=root, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("add", "maml_gpt.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    original = open(os.path.join(root, "maml_gpt.py")).read()
    kit.main(["blank", "inner_loop"], root=root)
    shutil.rmtree(os.path.join(root, kit.SAVED))
    kit.main(["restore", "inner_loop"], root=root)
    assert open(os.path.join(root, "maml_gpt.py")).read() == original


def test_list_shows_every_lesson(capsys):
    kit.main(["list"])
    out = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in out] == [les.name for les in kit.LESSONS]


def unique_body_lines(root, lesson, files):
    """Lines of the lesson's original body (comments included) that occur nowhere else in the project: if
    one of them is in a hand-out, the answer is."""
    source = kit.reference_source(root, lesson.file)
    lines = source.splitlines(keepends=True)
    node = kit.find(ast.parse(source), lesson.qualname)
    body = {ln.strip() for ln in lines[kit.body_start(lines, node) - 1:node.end_lineno]
            if len(ln.strip()) > 8}
    rest = "".join(lines[:node.lineno - 1] + lines[node.end_lineno:])
    rest += "".join(open(os.path.join(root, f), errors="replace").read() for f in files if f != lesson.file)
    return [ln for ln in body if ln not in rest]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_handout_holds_no_answer_anywhere(original, tmp_path, capsys):
    """Every lesson handed out at once: no line unique to a blanked body is in any file of the hand-out,
    hidden ones included, nor in any git object; LAB.md says what to write and how to grade it."""
    out = str(tmp_path / "lab")
    assert kit.main(["handout", *[les.name for les in PRESENT], "--out", out], root=original) is None
    assert "fresh git repository with one commit" in capsys.readouterr().out
    files = [f for f in kit.project_files(original) if f not in kit.TEACHER_ONLY]
    handed = {}
    for d, _, names in os.walk(out):
        for n in names:
            handed[os.path.relpath(os.path.join(d, n), out)] = open(os.path.join(d, n), "rb").read()
    def git(*a):
        return subprocess.run(["git", *a], cwd=out, check=True, capture_output=True).stdout

    handed["<every git object>"] = git("cat-file", "--batch-all-objects", "--batch")
    assert git("rev-list", "--all").count(b"\n") == 1  # one commit, no history
    assert not os.path.exists(os.path.join(out, kit.SAVED)) and "tests/test_exercises.py" not in handed
    assert "## For teachers" not in handed["README.md"].decode() and "LAB.md" in handed["README.md"].decode()
    for les in PRESENT:
        unique = unique_body_lines(original, les, files)
        assert unique, f"{les.name}: no line of its body is unique to it (the leak check would be empty)"
        leaks = [(ln, f) for ln in unique for f, data in handed.items() if ln.encode() in data]
        assert not leaks, f"{les.name}: the hand-out holds its answer: {leaks[:3]}"
        assert kit.status(out, les) == "blank"
        assert f"pytest -q -m {les.name}" in handed["LAB.md"].decode() or f"`{les.name}`" in \
            handed["LAB.md"].decode()
    assert kit.main(["handout", "rms_norm", "--out", out], root=original) == 1  # never over a folder
    assert "not empty" in capsys.readouterr().err


def write_submissions(original, subs):
    """A class of five: a correct copy (a whole hand-out, the answer written differently from the reference),
    a blank one, a wrong one, one that does not import and one that does not parse (just maml_gpt.py)."""
    lab = os.path.join(subs, "ann", "maml-gpt")  # unpacked one level down, as from an archive
    with contextlib.redirect_stdout(io.StringIO()):
        kit.main(["handout", "rms_norm", "--out", lab], root=original)
    source = open(os.path.join(lab, "maml_gpt.py")).read()
    stub = kit.STUB.format(name="rms_norm")
    right = "return (x.float() / (x.float() ** 2).mean(-1, keepdim=True).add(self.eps).sqrt()).to(x.dtype) " \
            "* self.weight"
    versions = dict(bob=source, carol=source.replace(stub, right.replace(".mean(", ".sum(")),
                    dave="import numpyy  # a typo\n" + source.replace(stub, right),
                    eve=source.replace(stub, "return x +"))
    open(os.path.join(lab, "maml_gpt.py"), "w").write(source.replace(stub, right))
    for name, text in versions.items():
        os.makedirs(os.path.join(subs, name))
        open(os.path.join(subs, name, "maml_gpt.py"), "w").write(text)


def test_grade_gives_one_right_row_per_student(original, tmp_path, capsys):
    subs, table = str(tmp_path / "subs"), str(tmp_path / "grades.csv")
    write_submissions(original, subs)
    assert kit.main(["grade", subs, "--lessons", "rms_norm", "--csv", table, "--jobs", "2"],
                    root=original) is None
    rows = {r["student"]: r for r in csv.DictReader(open(table))}
    assert {s: r["status"] for s, r in rows.items()} == dict(ann="passed", bob="blank", carol="failed",
                                                             dave="error", eve="error")
    assert "sum of squares" in rows["carol"]["message"]  # the grader names the mistake
    assert "does not import: ModuleNotFoundError" in rows["dave"]["message"]
    assert "does not parse (line" in rows["eve"]["message"]
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["student", "rms_norm", "passed"]
    assert "carol / rms_norm: failed: test_rms_norm_equals_the_formula: RMSNorm divides" in out


def test_grade_survives_an_infinite_loop(original, tmp_path, monkeypatch):
    """One student's grading that never ends costs that cell its time limit; the others are graded. (The
    commands are stand-ins: a loop, and one that reports a pass at once.)"""
    subs = str(tmp_path / "subs")
    source = open(os.path.join(original, "maml_gpt.py")).read()
    source = source.replace("xf = x.float()", "xf = x.float()  # ")  # not the reference: it must run
    for name in ("loops", "next"):
        os.makedirs(os.path.join(subs, name))
        open(os.path.join(subs, name, "maml_gpt.py"), "w").write(source)
    passes = "import json, sys; json.dump(dict(code=0, outcomes={'t': 'passed'}, messages={}, errors=[]), " \
             "open(sys.argv[1], 'w'))"
    monkeypatch.setattr(kit, "grading_command", lambda tree, lesson, result: (
        [sys.executable, "-c", "while True: pass"] if f"{os.sep}loops{os.sep}" in tree
        else [sys.executable, "-c", passes, result]))
    rows = kit.grade(original, subs, ["rms_norm"], timeout=2, jobs=1)
    assert [(s, st) for s, _, st, _ in rows] == [("loops", "error"), ("next", "passed")]
    assert "ran past the time limit of 2 s" in rows[0][3]


def test_marker_tests_fail_on_blanks_and_plants_and_pass_on_the_original(tmp_path):
    """The grading, end to end, in one subprocess (see grade_all)."""
    root = copy_repo(tmp_path / "repo")
    out = str(tmp_path / "results.json")
    script = os.path.join(root, "tests", "test_exercises.py")  # the copy's kit acts on the copy
    r = subprocess.run([sys.executable, script, root, out], capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    problems = []
    for name, variant, outcomes, messages in json.load(open(out)):
        n_failed = sum(o == "failed" for o in outcomes.values())
        if not outcomes:
            problems.append(f"{name} / {variant}: no test ran")
        elif variant == "blank" and n_failed < len(outcomes):
            problems.append(f"{name} / blank: these tests do not need it: "
                            f"{[t for t, o in outcomes.items() if o != 'failed']}")
        elif variant == "restored" and any(o != "passed" for o in outcomes.values()):
            problems.append(f"{name} / restored: {outcomes}")
        elif variant.startswith("plant") and not n_failed:
            problems.append(f"{name} / {variant}: not caught, all {len(outcomes)} tests passed")
        elif variant.startswith("plant") and variant[7:] in NAMES_THE_IDEA \
                and NAMES_THE_IDEA[variant[7:]] not in messages[0]:
            problems.append(f"{name} / {variant}: caught, but the message does not say "
                            f"{NAMES_THE_IDEA[variant[7:]]!r}: {messages[0]!r}")
        elif variant == "dependents":  # rms_norm blank, all of test_model.py: its test fails, the others skip
            bad = {t: o for t, o in outcomes.items() if o == "failed" and "rms_norm" not in t}
            if bad or not any(o.startswith("skipped: needs maml_gpt.py:RMSNorm.forward")
                              for o in outcomes.values()):
                problems.append(f"rms_norm blank, test_model.py: {outcomes}")
    assert not problems, "\n".join(problems)


def grade_all(root, out):
    """For every lesson present, in the repository copy at `root`: blank -> run its marker's tests; each
    plant -> run them (stop at the first failure); restore -> run them. One process, so torch is imported
    once; the copy's own modules are imported afresh for every pytest run. Writes
    [(lesson, variant, {test: outcome})] to `out`."""
    sys.dont_write_bytecode = True  # a same-size edit within a second must never reuse a stale .pyc

    def run(*args):
        # maml_gpt, finetune_ner, conftest, test_*: fresh each time
        for name, mod in list(sys.modules.items()):
            if (name != "__main__"
                    and os.path.abspath(getattr(mod, "__file__", None) or "/").startswith(root + os.sep)):
                del sys.modules[name]
        rec = kit.Recorder(threads=1)  # after conftest's 2: on a busy machine a second thread spins
        # no:unraisableexception: its five gc.collect() per session cost more than the tests themselves here
        pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception", "--rootdir", root,
                     *args], plugins=[rec])
        return rec.outcomes, list(rec.messages.values())

    results = []
    tests = os.path.join(root, "tests")
    for lesson in PRESENT:
        files = [os.path.join(tests, f) for f in sorted(os.listdir(tests))
                 if f.startswith("test_")
                 and f"@pytest.mark.{lesson.name}\n" in open(os.path.join(tests, f)).read()]
        path = os.path.join(root, lesson.file)
        original = open(path).read()
        kit.main(["blank", lesson.name], root=root)
        results.append((lesson.name, "blank", *run("-m", lesson.name, *files)))
        kit.main(["restore", lesson.name], root=root)
        for desc, subs in PLANTS[lesson.name].items():
            with open(path, "w") as f:
                f.write(planted(original, lesson, subs))
            results.append((lesson.name, f"plant: {desc}", *run("-m", lesson.name, "--maxfail=1", *files)))
        with open(path, "w") as f:
            f.write(original)
        results.append((lesson.name, "restored", *run("-m", lesson.name, *files)))
    kit.main(["blank", "rms_norm"], root=root)
    results.append(("rms_norm", "dependents", *run(os.path.join(root, "tests", "test_model.py"))))
    kit.main(["restore", "rms_norm"], root=root)
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    grade_all(os.path.abspath(sys.argv[1]), sys.argv[2])
