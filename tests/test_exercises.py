"""The classroom kit (tests/exercises.py): blank, restore and list, and the grading itself. In a copy of the
repository, every lesson's marker tests all fail on a blank body, catch each planted wrong version, and pass
again once it is restored; a blanked function skips the tests that merely depend on it."""
import ast
import contextlib
import csv
import functools
import io
import json
import linecache
import os
import shutil
import subprocess
import sys

import pytest

import exercises as kit

# A student's own inner loop, right in its maths, the weights as a dict of tensors (BODY plants replace the
# whole body after the docstring).
STUDENT_LOOP = """\
    feats = support_feats.detach().float()
    step = {k: (lr if not isinstance(lr, dict) else lr.get(k.split(".")[0], 0.0)) for k in phi0}
    moving = [k for k in phi0 if step[k] != 0]
    w, size = {k: p.detach() for k, p in phi0.items()}, torch.ones((), device=feats.device)
    loss_at = lambda w: F.cross_entropy(head_logits(head, w, feats), support_labels)
    with torch.enable_grad(), torch.autocast(feats.device.type, enabled=False):
        for t in range(steps):
            w = {k: v.detach().requires_grad_() if k in moving else v for k, v in w.items()}
            loss = loss_at(w)
            grads = dict(zip(moving, torch.autograd.grad(loss, [w[k] for k in moving])))
            trial = {k: w[k].detach() - size * step[k] * grads[k] if k in moving else w[k] for k in w}
            if backtrack:
                with torch.no_grad():
                    up = loss_at(trial) > loss
                trial = {k: torch.where(up, w[k].detach(), v) for k, v in trial.items()}
                size = torch.where(up, size / 2, size)
            w = trial
    return {k: p + (w[k].detach() - p).detach() for k, p in phi0.items()}
"""
IN_PLACE_LOOP = """\
    feats = support_feats.detach().float()
    step = {k: (lr if not isinstance(lr, dict) else lr.get(k.split(".")[0], 0.0)) for k in phi0}
    with torch.enable_grad(), torch.autocast(feats.device.type, enabled=False):
        for t in range(steps):
            loss = F.cross_entropy(head_logits(head, phi0, feats), support_labels)
            grads = torch.autograd.grad(loss, list(phi0.values()))
            with torch.no_grad():
                for (k, p), g in zip(phi0.items(), grads):
                    p.sub_(step[k] * g)
    return phi0
"""
BODY = "<the whole body>"
SECOND_ORDER = "second order: create_graph=True and no detach, the graph runs through every step"

# Plausible wrong versions, at least one per lesson: description -> [(original snippet, wrong snippet), ...],
# applied in order inside the function (BODY: the whole body). The lesson's marker tests must fail on every
# one of them, and the first failure's message must name the mistake (NAMES_THE_IDEA).
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
        "wrong frequency per pair, the pairs right (HF's doubled tables read at every other column)": [
            ("x0, x1 = x.float()",
             "cos, sin = (torch.cat([t, t], -1)[..., ::2] for t in (cos, sin)); x0, x1 = x.float()")],
        "arithmetic in bf16 (the tables cast to x's dtype)": [
            ("x.float().unflatten(-1, (-1, 2)).unbind(-1)",
             "x.unflatten(-1, (-1, 2)).unbind(-1); cos, sin = cos.to(x.dtype), sin.to(x.dtype)")],
        "fp32 returned for bf16 input (no cast back)": [(".flatten(-2).type_as(x)", ".flatten(-2)")],
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
        SECOND_ORDER: [
            ("torch.cat([phi0[k].detach().reshape(-1) for k in moving])",
             "torch.cat([phi0[k].reshape(-1) for k in moving])"),
            ("torch.autograd.grad(loss, theta)", "torch.autograd.grad(loss, theta, create_graph=True)"),
            ("theta, loss = theta.detach(), loss.detach()", "loss = loss.detach()"),
            ("return {k: p + (fast[k] - p).detach() for k, p in phi0.items()}", "return fast")],
        "steps the head's own tensors in place (no fresh copies)": [(BODY, IN_PLACE_LOOP)],
        "writes phi_T back into the head": [
            ("fast = weights(theta)\n", "fast = weights(theta)\n    with torch.no_grad():\n"
             "        [phi0[k].copy_(fast[k]) for k in moving]\n")],
        "one learning rate for both groups (lr['body'] everywhere)": [
            ('lr.get(k.split(".")[0], 0.0)', 'lr["body"]')],
        "a learning-rate group missing from lr is an error, not 0": [
            ('lr.get(k.split(".")[0], 0.0)', 'lr[k.split(".")[0]]')],
        "off by one: steps - 1 steps": [("for t in range(steps):", "for t in range(steps - 1):")],
        "backtracking keeps the bad step (halves, no undo)": [
            ("theta, grad = torch.where(up, last, theta), torch.where(up, last_grad, grad)", "grad = grad"),
            ("rate, loss = torch.where(up, rate / 2, rate), torch.where(up, best, loss)",
             "rate = torch.where(up, rate / 2, rate)"),
            ("theta = torch.where(support_loss(theta) > best, last, theta)", "theta = theta")],
        "backtracking never judges the last step": [
            ("theta = torch.where(support_loss(theta) > best, last, theta)", "theta = theta")],
        "backtracking decided on the host (a Python if on the loss)": [
            ("up = loss > best\n" + " " * 16 + "theta, grad = torch.where(up, last, theta), "
             "torch.where(up, last_grad, grad)\n" + " " * 16
             + "rate, loss = torch.where(up, rate / 2, rate), torch.where(up, best, loss)",
             "if loss > best:\n" + " " * 20 + "theta, grad, rate, loss = last, last_grad, rate / 2, best")],
        "the weights as a dict of tensors, not one flat vector (right maths)": [(BODY, STUDENT_LOOP)],
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
    "wrong frequency per pair, the pairs right (HF's doubled tables read at every other column)":
        "wrong frequencies",
    "arithmetic in bf16 (the tables cast to x's dtype)": "RoPE computes in bf16",
    "fp32 returned for bf16 input (no cast back)": "must return x's dtype",
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
    SECOND_ORDER: "the inner loop is second order",
    "steps the head's own tensors in place (no fresh copies)": "steps the head's own tensors in place",
    "writes phi_T back into the head": "writes phi_T back into the head",
    "one learning rate for both groups (lr['body'] everywhere)": "one learning rate for both groups",
    "a learning-rate group missing from lr is an error, not 0": "missing from lr must mean 0",
    "off by one: steps - 1 steps": "off by one",
    "backtracking keeps the bad step (halves, no undo)": "keeps a step that raised the support loss",
    "backtracking never judges the last step": "does not judge the last step",
    "backtracking decided on the host (a Python if on the loss)": "waits on the host",
    "the weights as a dict of tensors, not one flat vector (right maths)": "ONE flat vector",
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
    if subs[0][0] is BODY:  # a student's own body under the docstring
        start = kit.body_start(lines, node)
        return "".join(lines[:start - 1]) + subs[0][1] + "".join(lines[node.end_lineno:])
    body = kit.function_text(lines, node)
    for old, new in subs:
        assert body.count(old) == 1, \
            f"{lesson.name}: {old!r} occurs {body.count(old)} times in {lesson.qualname}"
        body = body.replace(old, new)
    return "".join(lines[:node.lineno - 1]) + body + "".join(lines[node.end_lineno:])


@functools.cache
def marked_tests():
    return kit.marked_tests(kit.ROOT)  # every test file parsed once, not once per lesson


@pytest.mark.parametrize("lesson", kit.LESSONS, ids=lambda les: les.name)
def test_every_lesson_has_tests_and_plants(lesson, pytestconfig, original):
    # registered: no warnings
    assert any(m.startswith(lesson.name + ":") for m in pytestconfig.getini("markers"))
    if lesson not in PRESENT:
        pytest.skip(f"{lesson.qualname} is not in {lesson.file} yet")
    assert marked_tests().get(lesson.name, 0) >= 1, \
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
    """Lines of the lesson's original body (comments included) that occur nowhere else in the project
    (`files`: {path: text}): if one of them is in a hand-out, the answer is."""
    source = kit.reference_source(root, lesson.file)
    lines = source.splitlines(keepends=True)
    node = kit.find(ast.parse(source), lesson.qualname)
    body = {ln.strip() for ln in lines[kit.body_start(lines, node) - 1:node.end_lineno]
            if len(ln.strip()) > 8}
    rest = "".join(lines[:node.lineno - 1] + lines[node.end_lineno:])
    rest += "".join(text for f, text in files.items() if f != lesson.file)
    return [ln for ln in body if ln not in rest]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_handout_holds_no_answer_anywhere(original, tmp_path, capsys):
    """Every lesson handed out at once: no line unique to a blanked body is in any file of the hand-out,
    hidden ones included, nor in any git object; LAB.md says what to write and how to grade it."""
    out = str(tmp_path / "lab")
    assert kit.main(["handout", *[les.name for les in PRESENT], "--out", out], root=original) is None
    assert "fresh git repository with one commit" in capsys.readouterr().out
    files = {f: open(os.path.join(original, f), errors="replace").read() for f in kit.project_files(original)
             if f not in kit.TEACHER_ONLY}  # read once for every lesson
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


def write_class(original, subs):
    """The class of a hand-out of apply_rope and inner_loop: alice right (a whole copy, one level down as
    from an archive, her answers written apart from the reference), bob the hand-out unchanged, carol a
    second-order inner loop and apply_rope blank (maml_gpt.py only), dave a file that does not import
    (apply_rope written, inner_loop blank), eve one that does not parse, frank nothing of the project."""
    lab = os.path.join(subs, "alice", "maml-gpt")
    with contextlib.redirect_stdout(io.StringIO()):
        kit.main(["handout", "apply_rope", "inner_loop", "--out", lab], root=original)
    blank = open(os.path.join(lab, "maml_gpt.py")).read()
    source = open(os.path.join(original, "maml_gpt.py")).read()
    tree, lines = ast.parse(source), source.splitlines(keepends=True)
    ref = {q: kit.function_text(lines, kit.find(tree, q)) for q in ("apply_rope", "inner_loop")}
    mine = {q: t.replace('"""\n', '"""\n    # written in class\n', 1) for q, t in ref.items()}
    wrong = planted(source, kit.BY_NAME["inner_loop"], PLANTS["inner_loop"][SECOND_ORDER])
    wrong = kit.function_text(wrong.splitlines(keepends=True), kit.find(ast.parse(wrong), "inner_loop"))
    versions = dict(bob=blank, carol=kit.splice(blank, dict(inner_loop=wrong)),
                    dave="import numpyy  # a typo\n" + kit.splice(blank, dict(apply_rope=mine["apply_rope"])),
                    eve=blank.replace(kit.STUB.format(name="apply_rope"), "return x +"))
    open(os.path.join(lab, "maml_gpt.py"), "w").write(kit.splice(blank, mine))
    for name, text in versions.items():
        os.makedirs(os.path.join(subs, name))
        open(os.path.join(subs, name, "maml_gpt.py"), "w").write(text)
    os.makedirs(os.path.join(subs, "frank"))
    open(os.path.join(subs, "frank", "notes.txt"), "w").write("I ran out of time\n")


def test_grade_grades_what_was_handed_out(original, tmp_path, capsys):
    """The default command grades the lessons the last hand-out blanked, and only those; one grading round
    serves every row."""
    subs, table = str(tmp_path / "subs"), str(tmp_path / "grades.csv")
    os.makedirs(os.path.join(subs, "alice"))
    if os.path.exists(os.path.join(original, kit.RECORD)):
        os.remove(os.path.join(original, kit.RECORD))
    assert kit.main(["grade", subs], root=original) == 1  # nothing handed out yet: say what to do
    assert "no hand-out is recorded" in capsys.readouterr().err
    write_class(original, subs)
    assert kit.main(["grade", subs, "--csv", table, "--jobs", "2"], root=original) is None
    rows = list(csv.DictReader(open(table)))
    assert {r["lesson"] for r in rows} == {"apply_rope", "inner_loop"}  # nothing else was handed out
    got = {(r["student"], r["lesson"]): r["status"] for r in rows}
    assert got == {**{("alice", les): "passed" for les in ("apply_rope", "inner_loop")},
                   **{("bob", les): "blank" for les in ("apply_rope", "inner_loop")},
                   ("carol", "apply_rope"): "blank", ("carol", "inner_loop"): "failed",
                   **{(s, les): "error" for s in ("dave", "eve") for les in ("apply_rope", "inner_loop")},
                   **{("frank", les): "not handed in" for les in ("apply_rope", "inner_loop")}}
    msg = {(r["student"], r["lesson"]): r["message"] for r in rows}
    assert "the inner loop is second order" in msg["carol", "inner_loop"]
    assert all(msg["dave", les].startswith("does not import: ModuleNotFoundError")
               for les in ("apply_rope", "inner_loop"))
    assert all("does not parse (line" in msg["eve", les] for les in ("apply_rope", "inner_loop"))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("grading the lessons handed out in ") and out[1].split() == \
        ["student", "apply_rope", "inner_loop", "passed"]
    assert [ln.split()[-1] for ln in out[2:8]] == ["2/2", "0/2", "0/2", "0/2", "0/2", "0/2"]
    assert any(ln.startswith("carol / inner_loop: failed: test_inner_loop_is_first_order: the inner loop is "
                             "second order") for ln in out)


def test_grade_survives_an_infinite_loop(original, tmp_path, monkeypatch):
    """One student's grading that never ends costs that cell its time limit; the others are graded. (The
    commands are stand-ins: a loop that never ends, idle so that it costs no CPU, and one that reports a pass
    at once.)"""
    subs = str(tmp_path / "subs")
    source = open(os.path.join(original, "maml_gpt.py")).read()
    source = source.replace("xf = x.float()", "xf = x.float()  # ")  # not the reference: it must run
    for name in ("loops", "next"):
        os.makedirs(os.path.join(subs, name))
        open(os.path.join(subs, name, "maml_gpt.py"), "w").write(source)
    passes = "import json, sys; json.dump(dict(code=0, outcomes={'t': 'passed'}, messages={}, errors=[]), " \
             "open(sys.argv[1], 'w'))"
    monkeypatch.setattr(kit, "grading_command", lambda tree, lesson, result: (
        [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"] if f"{os.sep}loops{os.sep}" in tree
        else [sys.executable, "-c", passes, result]))
    rows = kit.grade(original, subs, ["rms_norm"], timeout=2, jobs=1)
    assert [(s, st) for s, _, st, _ in rows] == [("loops", "error"), ("next", "passed")]
    assert "ran past the time limit of 2 s" in rows[0][3]


def start_grading(folder):
    """grade_all on a copy of the repository, in a subprocess (its own imports of the copy's modules), its
    output to a file: -> (the process, where its results go, where its output goes)."""
    root = copy_repo(os.path.join(folder, "repo"))
    out, log = os.path.join(folder, "results.json"), open(os.path.join(folder, "output.txt"), "w+")
    script = os.path.join(root, "tests", "test_exercises.py")  # the copy's kit acts on the copy
    proc = subprocess.Popen([sys.executable, script, root, out], stdout=log, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    return proc, out, log


STARTED = []  # the grading conftest.py started when this test was collected (it runs beside the others)


def test_marker_tests_fail_on_blanks_and_plants_and_pass_on_the_original(tmp_path):
    """The grading, end to end, in one subprocess (see grade_all)."""
    proc, out, log = STARTED.pop() if STARTED else start_grading(str(tmp_path))
    assert proc.wait(timeout=900) == 0, (log.seek(0), log.read()[-4000:])[1]
    results = json.load(open(out))
    shutil.rmtree(os.path.dirname(out))
    problems = []
    for name, variant, outcomes, messages in results:
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


# Lessons blanked together for the blank check: no lesson's tests call another lesson of its group (a test
# that did would be skipped as needing the other, and the check would report it), so one pytest run per
# group serves every lesson in it.
BLANK_TOGETHER = [("rms_norm", "apply_rope", "sample_episode", "episode_init", "effective_rank", "entity_f1"),
                  ("attention", "inner_loop"), ("attention_entropy", "meta_micro_step", "lm_loss")]


class Markers:
    """pytest plugin: the lesson markers of every collected test, by node id."""

    def __init__(self):
        self.of = {}

    def pytest_collection_modifyitems(self, items):
        self.of.update({item.nodeid: {m.name for m in item.iter_markers()} for item in items})


def grade_all(root, out, names=()):
    """For every lesson present, in the repository copy at `root`: blank (with its group) -> run its marker's
    tests; restore; each plant -> run them (stop at the first failure, as `grade` does); then the restored
    originals, every lesson's tests in one run. One process, so torch is imported once; the copy's own
    modules and test files are imported once, and each run swaps in the lesson functions as the files hold
    them (sync). Writes [(lesson, variant, {test: outcome}, messages)]
    to `out`."""
    sys.dont_write_bytecode = True  # a same-size edit within a second must never reuse a stale .pyc

    loaded = {}  # (file, qualname) -> the text of the function the imported module runs

    def sync():
        """Each lesson function whose text in its file changed since its module ran it: compiled from the file
        (its own line numbers) into the imported module, in place. The modules, conftest and the test files
        are imported once, not once per run: a run costs its tests, not the imports and their compiling."""
        linecache.checkcache()
        for file in dict.fromkeys(les.file for les in kit.LESSONS):
            path = os.path.join(root, file)
            mod = sys.modules.get(file[:-3].replace("/", "."))
            if mod is not None and os.path.abspath(mod.__file__) != path:
                raise AssertionError(f"{mod.__name__} is imported from {mod.__file__}, not from {path}")
            source = open(path).read()
            tree, lines = ast.parse(source), source.splitlines(keepends=True)
            for les in (les for les in kit.LESSONS if les.file == file):
                node = kit.find(tree, les.qualname)
                if node is None:
                    continue
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                text = "".join(lines[first - 1:node.end_lineno])
                if mod is not None and loaded.get((file, les.qualname), text) != text:
                    *cls, name = les.qualname.split(".")
                    # a method keeps its indentation under `if 1:`; the padding keeps its line numbers
                    code = "\n" * (first - 2) + "if 1:\n" + text if cls else "\n" * (first - 1) + text
                    scope = {}
                    exec(compile(code, path, "exec"), mod.__dict__, scope)
                    setattr(getattr(mod, cls[0]) if cls else mod, name, scope[name])
                loaded[file, les.qualname] = text  # before the first import: what the import will read

    def run(*args, markers=None):
        sync()
        rec = kit.Recorder(threads=1)  # after conftest's 2: on a busy machine a second thread spins
        # no:unraisableexception: its five gc.collect() per session cost more than the tests themselves here
        pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception", "--rootdir", root,
                     *args], plugins=[rec] + ([markers] if markers else []))
        return rec.outcomes, list(rec.messages.values())

    present = [les.name for les in PRESENT if not names or les.name in names]
    assert sorted(n for group in BLANK_TOGETHER for n in group) == sorted(les.name for les in kit.LESSONS)
    files_of = {n: [os.path.join(root, f) for f in kit.marker_files(root, n)] for n in present}  # as graded
    results = []
    for group in [[n for n in g if n in present] for g in BLANK_TOGETHER]:
        if not group:
            continue
        originals = {n: open(os.path.join(root, kit.BY_NAME[n].file)).read() for n in group}
        kit.main(["blank", *group], root=root)
        markers = Markers()
        outcomes, _ = run("-m", " or ".join(group), *sorted({f for n in group for f in files_of[n]}),
                          markers=markers)
        kit.main(["restore", *group], root=root)
        for n in group:
            results.append((n, "blank", {t: o for t, o in outcomes.items() if n in markers.of[t]}, []))
            same = open(os.path.join(root, kit.BY_NAME[n].file)).read() == originals[n]
            results.append((n, "restored", {"the same bytes": "passed" if same else "failed"}, []))
    for name in present:
        lesson = kit.BY_NAME[name]
        path = os.path.join(root, lesson.file)
        original = open(path).read()
        for desc, subs in PLANTS[lesson.name].items():
            with open(path, "w") as f:
                f.write(planted(original, lesson, subs))
            results.append((name, f"plant: {desc}", *run("-m", name, "--maxfail=1", *files_of[name])))
        with open(path, "w") as f:
            f.write(original)
    # the restored originals: every marker's tests pass, graded as `grade` runs them (one pytest run for all)
    files = sorted({f for n in present for f in files_of[n]})
    results.append(("every lesson", "restored", *run("-m", " or ".join(present), *files)))
    if not names or "rms_norm" in names:
        kit.main(["blank", "rms_norm"], root=root)
        results.append(("rms_norm", "dependents", *run(os.path.join(root, "tests", "test_model.py"))))
        kit.main(["restore", "rms_norm"], root=root)
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    grade_all(os.path.abspath(sys.argv[1]), sys.argv[2], sys.argv[3:])  # lesson names: only those
