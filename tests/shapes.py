"""Synthetic runs in the training log's own keys (metrics.jsonl, config.json), shaped like the curves the
paper describes (§6, Fig. 4 and 6) and like the ones it says are not a transition; for the scoreboard tests.

A run logs a window every 10 steps up to 400 (acc_*, loss_*), PER and attention entropy every 25 steps from
step 0 (as --dynamics_every 25), and the held-out few-shot eval every 50. EVENT is the step of the paper's
shape: the PER probe at 250 is the first after the drop, the window at 260 the first after the jump."""
import json
import math
import os

import numpy as np

STEPS, EVENT, N_WAY = 400, 250, 32
CHANCE = 1 / N_WAY


def acc_curve(shape, s, event=EVENT):
    """Query accuracy after adaptation at window `s` (noise-free)."""
    base = CHANCE + 0.03
    after = s > event
    return {"jump": base + (0.42 + 0.1 * (s - event) / STEPS if after else 0.0),  # plateau, then a clean jump
            "smooth": base + 0.55 * s / STEPS,  # a steady climb from the start: no plateau
            "flat": base,
            "small_step": base + 0.12 * after,  # a clean step, small for the paper's "near chance to > 0.5"
            "ramp": base + 0.3 * min(max((s - event) / 30, 0.0), 1.0),  # the rise spread over three windows
            "spike": base + 0.45 * (s == event + 10),  # one outlier window
            "transient": base + 0.45 * (event < s <= event + 20),  # up for two windows, then back
            "high_plateau": 0.35 + 0.3 * after,  # a jump, but from a plateau far above chance
            }[shape]


def per_curve(shape, s, start):
    """Weight PER of one attention matrix at probe `s` (noise-free), from its initial value `start`."""
    slow = 1 - 0.02 * s / STEPS
    return start * {"drop": slow * (0.92 if s >= EVENT else 1.0),  # a decline and an abrupt 8 % drop
                    "smooth": 1 - 0.10 * s / STEPS,  # the same total decline, spread over the run
                    "flat": 1.0,
                    "rise_fall": 1 + 0.04 * min(s, 150) / 150 - 0.08 * (s >= EVENT),  # the old rule's shape
                    }[shape]


def grad_curve(shape, s, start):
    """Gradient PER: dips at EVENT and rebounds ('dip'), or stays ('flat')."""
    return start * (1 - 0.15 * (shape == "dip" and s == EVENT))


def write_run(path, ratio, seed=1, acc="jump", per="drop", grad="dip", noise=0.01, per_noise=0.001,
              fewshot=(0.30, 0.50), event=EVENT, speed=1.0, acc_event=None):
    """One run folder. ratio 0: a vanilla twin (no episodes, so no acc_* keys). fewshot: its prototype
    accuracy at ([MASK], the token before). speed scales the AR loss curve per AR step."""
    os.makedirs(path)
    rng = np.random.default_rng([seed, int(ratio * 10)])
    args = dict(hybrid_ratio=ratio, n_way=N_WAY, seed=seed, max_steps=STEPS, log_every=10, dynamics_every=25,
                eval_every=50, lr=1e-3)
    json.dump({"args": args}, open(os.path.join(path, "config.json"), "w"))
    n_meta = 5 if ratio else 0
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for s in range(0, STEPS + 1, 5):
            r = dict(step=s, tokens=s * 1000, tokens_ar=s * (10 - n_meta) * 100, tokens_meta=s * n_meta * 100)
            if s % 10 == 0 and s:
                ar = s * (10 - n_meta) / 10
                r.update(n_ar_steps=10 - n_meta, n_meta_steps=n_meta,
                         loss_ar=2 + 8 * math.exp(-speed * ar / 150) + rng.normal(0, 0.01))
                if ratio:
                    q = acc_curve(acc, s, event if acc_event is None else acc_event)
                    q = min(1.0, q + rng.normal(0, noise))
                    r.update(loss_query=3.0, loss_mixed=(r["loss_ar"] + 3.0) / 2, acc_query_pre=CHANCE,
                             acc_query_post=q, acc_support_pre=0.2, acc_support_post=min(1.0, q + 0.2),
                             loss_support_pre=3.0, loss_support_post=2.5, head_weight_mean=0.0,
                             head_weight_std=0.09)
            if s % 25 == 0:
                shift = event - EVENT  # the PER shapes follow `event` too
                for layer in range(2):
                    for mod, w0, g0 in (("attention.v_proj", 0.95, 0.47), ("attention.o_proj", 0.80, 0.25),
                                        ("swiglu.w_2", 0.97, 0.75)):
                        attn = mod.startswith("attention")
                        w = per_curve(per if attn else "flat", s - shift, w0)
                        g = grad_curve(grad if attn else "flat", s - shift, g0)
                        r[f"per_weight/layers.{layer}.{mod}"] = w + rng.normal(0, per_noise)
                        r[f"per_grad/layers.{layer}.{mod}"] = g + rng.normal(0, per_noise)
                ent = 3.83 - 0.2 * s / STEPS
                r.update(attn_entropy=[[ent, ent], [ent, ent]], attn_entropy_mean=ent)
            if s % 50 == 0 and s:
                r.update(eval_ppl=math.exp(r["loss_ar"]), eval_fewshot_acc_pre=0.05, eval_fewshot_acc=0.2,
                         eval_proto_acc_mask=fewshot[0], eval_proto_acc_prev=fewshot[1])
            if len(r) > 4:
                f.write(json.dumps(r) + "\n")


# The cases: name -> (MAML run's shapes, vanilla run's PER shapes, the verdicts the paper's wording implies
# for (iii) diversify-then-compress and (iv) the phase transition).
CASES = {
    "paper": (dict(acc="jump", per="drop", grad="dip"), dict(per="smooth", grad="flat"), "holds", "holds"),
    "smooth climb": (dict(acc="smooth", per="smooth", grad="flat"), dict(per="smooth", grad="flat"),
                     "does not hold", "does not hold"),
    "jump without PER drop": (dict(acc="jump", per="smooth", grad="flat"), dict(per="smooth", grad="flat"),
                              "does not hold", "does not hold"),
    "noise on a flat line": (dict(acc="flat", per="flat", grad="flat", noise=0.03, per_noise=0.003),
                             dict(per="flat", grad="flat", per_noise=0.003), "does not hold",
                             "does not hold"),
    "clean step +0.12": (dict(acc="small_step", per="drop", grad="dip"), dict(per="smooth", grad="flat"),
                         "holds", "does not hold"),
    "rise over three windows": (dict(acc="ramp", per="drop", grad="dip"), dict(per="smooth", grad="flat"),
                                "holds", "holds"),
    "one outlier window": (dict(acc="spike", per="drop", grad="dip"), dict(per="smooth", grad="flat"),
                           "holds", "does not hold"),
    "up for two windows": (dict(acc="transient", per="drop", grad="dip"), dict(per="smooth", grad="flat"),
                           "holds", "does not hold"),
    "plateau far above chance": (dict(acc="high_plateau", per="drop", grad="dip"),
                                 dict(per="smooth", grad="flat"), "holds", "does not hold"),
    "vanilla drops too": (dict(acc="jump", per="drop", grad="dip"), dict(per="drop", grad="dip"),
                          "does not hold", "holds"),
    "jump 100 steps before the PER drop": (dict(acc="jump", per="drop", grad="dip", acc_event=150),
                                           dict(per="smooth", grad="flat"), "holds", "does not hold"),
    "old rule's rise then fall": (dict(acc="jump", per="rise_fall", grad="dip"),
                                  dict(per="smooth", grad="flat"), "holds", "holds"),
}


def write_pair(root, case, seed=1, **maml_kw):
    m, v, _, _ = CASES[case]
    mp, vp = os.path.join(root, f"maml-s{seed}"), os.path.join(root, f"vanilla-s{seed}")
    write_run(mp, 0.5, seed, **{**m, **maml_kw})
    write_run(vp, 0.0, seed, **v)
    return mp, vp
