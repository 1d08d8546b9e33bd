"""Shared fixtures. Tests run on the CPU, offline (no hub), and deterministically."""
import contextlib
import io
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the suite may touch the network
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf-home-"))

import torch  # noqa: E402

# One thread. The suite's models are tiny (d = 24, 32 tokens), where a second thread saves little, and on
# shared cores every op of a 2-thread run waits for a descheduled thread: the end-of-run 40-token sample took
# 4 s on 1 thread and 104 s on 2 at load 14 (`python -c` of maml_gpt.complete on a fresh d = 24 model).
torch.set_num_threads(1)

# A small but real configuration: the toy world (2,000 paragraphs), a 2-layer d=24 model, 32-token sequences.
SMALL = ["--data", "toy", "--toy_docs", "2000", "--d_model", "24", "--n_layers", "2", "--seq_len", "32",
         "--batch_size", "4", "--n_way", "8", "--k_shot", "2", "--q_query", "2", "--inner_steps", "3",
         "--eval_every", "0", "--dynamics_every", "0", "--log_every", "1", "--lr", "1e-3",
         "--warmup_steps", "2", "--smlmt_min_count", "8", "--smlmt_skip_top", "50"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One prepared toy corpus (and SMLMT index), built once per pytest run and shared by every test."""
    d = str(tmp_path_factory.mktemp("data"))
    import maml_gpt
    from data import prepare
    args = maml_gpt.parse_args(SMALL + ["--data_dir", d])
    corpus = maml_gpt.prepare_corpus(args)
    prepare.build_smlmt_index(corpus, args)
    return d


@pytest.fixture
def small_args(data_dir, tmp_path):
    """argv for a fast CLI run in a fresh out_dir."""
    return SMALL + ["--data_dir", data_dir, "--out_dir", str(tmp_path / "run")]


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory):
    """One run of SMALL for 4 steps (both branches, eval and probe every 2 steps), trained once for every test
    that reads a run: (its folder, what it printed). A test that changes the folder works on a copy."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert run_cli(SMALL + ["--data_dir", data_dir, "--out_dir", out, "--max_steps", "4",
                                "--eval_every", "2", "--dynamics_every", "2"]) == 0
    return out, stdout.getvalue()


# ------------------------------------------------------------------------------------------------------------
# The classroom kit (tests/exercises.py): one marker per lesson function, and a blanked function skips,
# rather than fails, every test that merely depends on it. Its own tests (the marker) still fail until it
# is written.

import exercises  # noqa: E402

_SKIPPED_FOR = {}  # lesson name -> tests skipped because it is blank


def pytest_configure(config):
    for lesson in exercises.LESSONS:
        config.addinivalue_line("markers", f"{lesson.name}: grades {lesson.file}:{lesson.qualname}, "
                                f"{lesson.summary}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    if not rep.failed:
        return
    # In this process the exception is the stub's NotImplementedError; from a subprocess (a CLI run) it
    # reaches the test's failure message or captured output as text. Either way the stub names its lesson.
    text = rep.longreprtext + "".join(content for _, content in rep.sections)
    names = sorted(set(exercises.BLANKED.findall(text)) & set(exercises.BY_NAME))
    if names and not any(item.get_closest_marker(n) for n in names):
        need = ", ".join(f"{exercises.BY_NAME[n].file}:{exercises.BY_NAME[n].qualname}" for n in names)
        rep.outcome = "skipped"
        rep.longrepr = (str(item.path), item.location[1] or 0, f"needs {need}, blanked as an exercise "
                        f"(grade it: python -m pytest -m {names[0]})")
        for n in names:
            _SKIPPED_FOR[n] = _SKIPPED_FOR.get(n, 0) + 1


GRADING = "test_marker_tests_fail_on_blanks_and_plants_and_pass_on_the_original"


def pytest_collection_finish(session):
    """The kit's end-to-end grading costs one core for about 40 s, and the rest of the suite keeps to one core
    (above): when that test is selected, its subprocess starts now and runs beside the others."""
    for item in session.items:
        if item.name == GRADING:
            item.module.STARTED.append(item.module.start_grading(tempfile.mkdtemp(prefix="grading-")))


def pytest_sessionfinish(session):
    for item in session.items:  # a grading that no test waited for (-x, Ctrl-C): stopped, not left running
        if item.name == GRADING:
            for proc, _, _ in item.module.STARTED:
                proc.kill()


def pytest_terminal_summary(terminalreporter):
    for name, n in sorted(_SKIPPED_FOR.items()):
        terminalreporter.write_line(f"exercise {name} is blank: {n} test(s) that need it were skipped; "
                                    f"grade it with: python -m pytest -m {name}")


@contextlib.contextmanager
def no_stop_signals(verbose=True):
    """maml_gpt.stop_signals() for a run inside the test process: the stop flag, never the handlers."""
    yield dict(signum=0, at=0.0, armed=False)


def run_cli(argv, main=None):
    """Run a command in-process (maml_gpt's by default, or another entry point's main); -> its exit code.

    A training run started here does not install its SIGTERM / Ctrl-C handlers. In the test process they
    would take the signals meant for pytest: a time limit's SIGTERM (or a Ctrl-C) arriving during an
    in-process run would finish that run's step, save and exit 143, failing a test that passes whenever
    nothing signals it, and the suite would run on (the run ignores a repeated SIGTERM). The handlers are
    tested in real runs (tests/test_restarts.py) and by calling stop_signals() itself."""
    import maml_gpt
    real = maml_gpt.stop_signals
    maml_gpt.stop_signals = no_stop_signals
    try:
        (main or maml_gpt.main)(argv)
    except SystemExit as e:
        return e.code
    finally:
        maml_gpt.stop_signals = real
    return 0


# ------------------------------------------------------------------------------------------------------------
# Graders that name the idea: a lesson test says what is wrong in the student's terms, not "Mismatched
# elements: 2010 / 2048". The first line of a failure is what `exercises.py grade` shows for that student.

def close(a, b, atol, rtol):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol)


def check_close(got, want, idea, mistakes=(), atol=1e-5, rtol=1e-5):
    """Assert got == want (to atol, rtol). Otherwise fail with `idea` (what the function must do); when `got`
    equals a known wrong answer (mistakes: [(what the mistake is, its result)]), name that mistake first."""
    if close(got, want, atol, rtol):
        return
    for what, wrong in mistakes:
        if close(got, wrong, atol, rtol):
            pytest.fail(f"{what} ({idea})", pytrace=False)
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    if got.shape != want.shape:
        pytest.fail(f"{idea}: shape {tuple(got.shape)}, expected {tuple(want.shape)}", pytrace=False)
    err = (got.double() - want.double()).abs()
    pytest.fail(f"{idea}: off by up to {err.max().item():.3g} at {err.argmax().item()} (flat index) of "
                f"{err.numel()} values, {(err > atol + rtol * want.double().abs()).sum().item()} of them "
                f"beyond tolerance", pytrace=False)
