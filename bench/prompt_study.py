"""Which prompt layout, initial prompt and anchor make black-box tuning pay off, on equal budgets.

Centralized BBT in-process on the torch engine (no HTTP, no federation), so a comparison costs only model
time: one few-shot training set, CMA-ES over z with a fixed number of candidates, then zero-shot, calibrated
zero-shot and the tuned prompt on the same held-out test examples, with McNemar's exact test. Example:

    python -m bench.prompt_study --task amazon_snippets --placement after-text --init tokens --anchor auto

Several variants share one model load and one zero-shot pass: `--variants "placement=ahead,anchor=none;init=zeros"`
(each `;`-separated variant overrides the flags it names). Each variant appends one JSON line to --out
(default bench/results/<today>-prompt-study.jsonl).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fed_clients.evaluation import calibrated_predictions, fit_calibration, mcnemar_exact
from fed_clients.local_search import cma_seed, local_search
from fed_clients.tasks import get_task, with_placement
from fedbpt_wire.federation import PROJECTION_BASES
from fedbpt_wire.metrics import debiased_cross_entropy, label_cross_entropy
from fedbpt_wire.projection import Projection
from fedbpt_wire.schemas import PROMPT_SLOT, SLOT


def few_shot(train, per_class: int, seed: int):
    rng = np.random.default_rng([seed, 11])
    labels = np.array([ex.label for ex in train])
    picked = [i for c in np.unique(labels) for i in rng.choice(np.flatnonzero(labels == c), per_class, replace=False)]
    return [train[i] for i in sorted(picked)]


def cue_start(task, tokenizer):
    """The after-text template with its cue words moved into the prompt, and their token ids.

    "Review: {text}{prompt}\nSentiment:{mask}" becomes "Review: {text}{prompt}:{mask}" with the prompt starting
    as the embeddings of "\nSentiment": z = 0 then reads as the manual prompt (the cue tokenizes apart from the
    punctuation after it), and the search starts at the baseline instead of climbing back to it.
    """
    template = task.causal_template
    start = template.index(PROMPT_SLOT) + len(PROMPT_SLOT)
    words, tail = re.fullmatch(r"(.*?)(\W*)", template[start : template.index(SLOT)], re.S).groups()
    if not words.strip() or not tail:
        raise ValueError(f"task {task.name}: no cue words followed by punctuation after the prompt in {template!r}")
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    return replace(task, causal_template=template[:start] + template[start:].replace(words, "", 1)), ids


def iterations_within(args, train_size: int) -> int:
    """The most iterations (at least 1) whose batches and robust-bias refits fit in --budget sequences."""
    per_iteration = args.popsize * min(args.batch_size, train_size)
    refit = train_size if args.fitness == "robust-bias" else 0

    def cost(k: int) -> int:
        return k * per_iteration + -(-k // args.bias_every) * refit

    k = 1
    while cost(k + 1) <= args.budget:
        k += 1
    return k


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="amazon_snippets")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--label-words", default=None, help="comma-separated, e.g. ' bad, good' (default: the task's)")
    ap.add_argument("--placement", choices=["ahead", "after-text"], default="after-text")
    ap.add_argument(
        "--init",
        choices=["tokens", "random", "zeros", "cue"],
        default="tokens",
        help="cue (after-text only): the prompt starts as the template's own cue words (its L: their tokens) "
        "and replaces them, so z = 0 is the manual prompt",
    )
    ap.add_argument("--anchor", default="auto")
    ap.add_argument("--prompt-length", type=int, default=5)
    ap.add_argument("--intrinsic-dim", type=int, default=100)
    ap.add_argument("--popsize", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument(
        "--budget",
        type=int,
        default=0,
        help="scored sequences the search may spend (bias refits included); sets --iterations when given",
    )
    ap.add_argument(
        "--checkpoints",
        default="",
        help="comma-separated sequence counts at which to evaluate the search's mean on the test set "
        "(the accuracy-vs-sequences curve; the evaluation itself is not counted)",
    )
    ap.add_argument(
        "--basis",
        choices=PROJECTION_BASES,
        default="normal",
        help="the projection's rows (RunConfig.projection_basis): normal or real tokens' centred embeddings",
    )
    ap.add_argument("--sigma0", type=float, default=1.0)
    ap.add_argument(
        "--step-scale",
        type=float,
        default=1.0,
        help="CMA-ES starts at sigma0 x this; the projection's scale divides by sigma0 alone, so this, not sigma0, "
        "sets the first step in prompt space (1: about one word embedding's spread)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--fitness",
        choices=["ce", "debiased", "robust-bias"],
        default="ce",
        help="ce: the batch's cross-entropy; debiased: at the bias best for each candidate on its batch; "
        "robust-bias: at one bias per iteration, fitted on all training examples at the search's mean",
    )
    ap.add_argument("--mirrored", type=int, choices=[0, 1], default=0, help="antithetic (mirrored) candidates")
    ap.add_argument(
        "--bias-every",
        type=int,
        default=10,
        help="robust-bias: refit the bias every this many iterations (each refit scores every training example)",
    )
    ap.add_argument("--dtype", default="float32", help="the engine's dtype (bf16 ranks candidates like fp32)")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-kv-reuse", action="store_true")
    ap.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=2048,
        help="the engine's cache of text heads across calls: large enough for every training and test text, "
        "so evaluations and batches that repeat a text pay only for the prompt (logits unchanged)",
    )
    ap.add_argument("--device", default=None, help="torch device (default: cuda where present, else cpu)")
    ap.add_argument("--screen", action="store_true", help="only the initial prompt's accuracy on 200 test examples")
    ap.add_argument("--variants", default="", help="';'-separated variants of key=value overrides of the flags above")
    ap.add_argument("--out", default=time.strftime("bench/results/%Y-%m-%d-prompt-study.jsonl"))
    args = ap.parse_args(argv)

    from fed_clients.data import load_splits
    from inference_service.engine import ScoreBatch
    from inference_service.limits import Limits
    from inference_service.server import build_engine

    t_start = time.perf_counter()
    engine = build_engine(
        args.model,
        dtype=args.dtype,
        device=args.device,
        kv_reuse=not args.no_kv_reuse,
        limits=Limits(max_prefix_cache_bytes=args.prefix_cache_mb * 2**20),
    )
    task = get_task(args.task, args.label_words)
    splits = load_splits("default", task)
    train = few_shot(splits["train"], args.per_class, args.seed)
    test = splits["test"][: args.test_size]
    kind = engine.info.kind
    words = list(task.label_words)
    dim = engine.info.hidden_size

    def logits(prompts: np.ndarray, examples, t) -> np.ndarray:
        texts = [t.render(ex.fields, kind) for ex in examples]
        parts = [engine.score(ScoreBatch(prompts, texts[i : i + 256], words)).logits for i in range(0, len(texts), 256)]
        return np.concatenate(parts, axis=1)

    bare = np.zeros((1, 0, dim), np.float32)
    y_train = np.array([ex.label for ex in train])
    y_test = np.array([ex.label for ex in test])
    zs_train = logits(bare, train, task)[0]
    zs_test = logits(bare, test, task)[0]
    calibration = fit_calibration(zs_train, y_train)
    zs_correct = zs_test.argmax(-1) == y_test
    cal_correct = calibrated_predictions(zs_test, calibration) == y_test
    rows = []
    for variant in [v for v in args.variants.split(";") if v.strip()] or [""]:
        overrides = dict(kv.split("=", 1) for kv in variant.split(",") if kv.strip())
        run = argparse.Namespace(
            **{
                **vars(args),
                **{
                    k.replace("-", "_"): type(getattr(args, k.replace("-", "_")))(v)
                    if getattr(args, k.replace("-", "_")) is not None
                    else v
                    for k, v in overrides.items()
                },
            }
        )
        rows.append(tune(run, engine, task, train, test, y_train, y_test, zs_correct, cal_correct, logits, t_start))
    return rows


def tune(args, engine, task, train, test, y_train, y_test, zs_correct, cal_correct, logits, t_start) -> dict:
    from inference_service.layout import make_layout

    kind = engine.info.kind
    dim = engine.info.hidden_size
    engine.layout = make_layout(engine.tokenizer, kind, args.anchor)
    tuned_task = with_placement(task, args.placement)
    cue_ids = None
    if args.init == "cue":
        tuned_task, cue_ids = cue_start(tuned_task, engine.tokenizer)
        args.prompt_length = len(cue_ids)
    projection = Projection(
        args.seed,
        args.intrinsic_dim,
        args.prompt_length,
        dim,
        engine.info.embedding_std,
        args.sigma0,
        "zeros" if cue_ids else args.init,
        engine.token_embeddings,
        engine.info.vocab_size,
        args.basis,
    )
    if cue_ids:
        projection.offset = np.asarray(engine.token_embeddings(cue_ids), np.float32).reshape(len(cue_ids), dim)
    init_loss, init_acc = label_cross_entropy(
        logits(projection(np.zeros(args.intrinsic_dim)), test[:200], tuned_task), y_test[:200]
    )
    if args.screen:
        row = {
            "placement": args.placement,
            "init": args.init,
            "anchor": args.anchor,
            "L": args.prompt_length,
            "zero_shot_200": float(zs_correct[:200].mean()),
            "init_accuracy_200": float(init_acc[0]),
            "init_loss_200": float(init_loss[0]),
        }
        print(json.dumps(row), flush=True)
        return row

    if args.budget:
        args.iterations = iterations_within(args, len(train))
    rng = np.random.default_rng([args.seed, 12])
    batches = [rng.choice(len(train), min(args.batch_size, len(train)), replace=False) for _ in range(args.iterations)]
    t0 = time.perf_counter()
    trace: list[float] = []
    sequences = [0]
    fitted: dict[str, np.ndarray] = {}
    # The incumbent: the best mean yet by its loss at its own fitted bias on every training example, which the
    # robust-bias refit scores anyway; a mean is served only if it beats it on those examples.
    incumbent: dict = {"loss": np.inf}

    def fitness(z: np.ndarray, it: int) -> np.ndarray:
        idx = batches[it]
        batch_logits = logits(projection(z), [train[i] for i in idx], tuned_task)
        sequences[0] += batch_logits.shape[0] * batch_logits.shape[1]
        if args.fitness == "robust-bias":
            # One read-out bias for every candidate, fitted (cross-entropy-optimal, ridge-regularised) on every
            # training example at the candidates' mean and refitted every --bias-every iterations: a batch of 32
            # cannot over-fit it, and a candidate wins only by what it adds beyond that bias.
            if it % args.bias_every == 0:
                mean_z = np.mean(z, axis=0)
                mean_logits = logits(projection(mean_z[None]), train, tuned_task)
                sequences[0] += mean_logits.shape[1]
                mean_loss, mean_bias = debiased_cross_entropy(mean_logits, y_train)
                fitted["bias"] = mean_bias[0]
                if mean_loss[0] < incumbent["loss"]:
                    incumbent.pop("correct", None)  # its test correctness, evaluated once it is served
                    incumbent.update(loss=float(mean_loss[0]), z=mean_z, iteration=it)
            loss, _ = label_cross_entropy(batch_logits + fitted["bias"], y_train[idx])
        else:
            score = debiased_cross_entropy if args.fitness == "debiased" else label_cross_entropy
            loss, _ = score(batch_logits, y_train[idx])
        trace.append(float(loss.min()))
        return loss

    def evaluate(mean: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """The mean's raw and calibrated test correctness, its bias fitted on every training example, and its
        training loss at its own fitted bias (the incumbent's measure)."""
        prompt = projection(mean[None])
        test_logits = logits(prompt, test, tuned_task)[0]
        train_logits = logits(prompt, train, tuned_task)
        bias = fit_calibration(train_logits[0], y_train)
        train_loss = float(debiased_cross_entropy(train_logits, y_train)[0][0])
        return test_logits.argmax(-1) == y_test, calibrated_predictions(test_logits, bias) == y_test, train_loss

    def served(cal: np.ndarray, train_loss: float) -> np.ndarray:
        """The calibrated test correctness of what the incumbent rule serves: the incumbent where it beats the
        mean on the training examples."""
        if train_loss <= incumbent["loss"]:
            return cal
        if "correct" not in incumbent:
            incumbent["correct"] = evaluate(incumbent["z"])[1]
        return incumbent["correct"]

    marks = sorted(int(c) for c in args.checkpoints.split(",") if c.strip())
    curve: list[dict] = []
    eval_s = [0.0]

    def point(raw: np.ndarray, cal: np.ndarray, train_loss: float) -> dict:
        row = {
            "sequences": sequences[0],
            "tuned": float(raw.mean()),
            "tuned_calibrated": float(cal.mean()),
            "vs_calibrated_p": mcnemar_exact(cal, cal_correct),
        }
        if args.fitness == "robust-bias":
            kept = served(cal, train_loss)
            row.update(
                incumbent_calibrated=float(kept.mean()), incumbent_vs_calibrated_p=mcnemar_exact(kept, cal_correct)
            )
        return row

    def checkpoint(mean: np.ndarray) -> None:
        t = time.perf_counter()
        curve.append(point(*evaluate(mean)))
        eval_s[0] += time.perf_counter() - t

    def observe(it: int, mean: np.ndarray) -> None:
        if marks and sequences[0] >= marks[0]:
            while marks and sequences[0] >= marks[0]:
                marks.pop(0)
            checkpoint(mean)

    result = local_search(
        fitness,
        np.zeros(args.intrinsic_dim),
        args.sigma0 * args.step_scale,
        args.popsize,
        args.iterations,
        cma_seed(args.seed, 13),
        mirrored=bool(args.mirrored),
        observe=observe,
    )
    search_s = time.perf_counter() - t0 - eval_s[0]
    tuned_correct, tuned_cal_correct, train_loss = evaluate(result.mean)
    final = point(tuned_correct, tuned_cal_correct, train_loss)
    if args.checkpoints:
        curve.append(final)
    row = {
        "args": vars(args),
        "model": engine.info.name,
        "label_words": list(task.label_words),
        "test_examples": len(test),
        "zero_shot": float(zs_correct.mean()),
        "calibrated_zero_shot": float(cal_correct.mean()),
        "init_prompt_accuracy_200": float(init_acc[0]),
        "tuned": float(tuned_correct.mean()),
        "tuned_vs_zero_shot_p": mcnemar_exact(tuned_correct, zs_correct),
        "tuned_vs_calibrated_p": mcnemar_exact(tuned_correct, cal_correct),
        "tuned_calibrated": float(tuned_cal_correct.mean()),
        "tuned_calibrated_vs_calibrated_p": mcnemar_exact(tuned_cal_correct, cal_correct),
        **{k: final[k] for k in ("incumbent_calibrated", "incumbent_vs_calibrated_p") if k in final},
        "incumbent_iteration": incumbent.get("iteration") if train_loss > incumbent["loss"] else None,
        "candidates": result.evaluations,
        "sequences": sequences[0],
        "search_seconds": round(search_s, 1),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "best_batch_loss": trace,
        "curve": curve,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("best_batch_loss",)}))
    return row


if __name__ == "__main__":
    main()
