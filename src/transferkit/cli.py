"""The command line: parse, call the Python API, map UserError to one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from .config import RunConfig
from .errors import UserError

FIT_FLAGS_HELP = {
    "train": "training data: a table (.csv/.tsv/.jsonl/.parquet), an image folder, an IDX file, or 'fashion-mnist'",
    "val": "validation file (default: a stratified --val-fraction of train)",
    "test": "test file (default: a stratified --test-fraction of train)",
    "model": "packaged name (see 'transferkit models'), a local checkpoint folder, or a Hugging Face hub name",
    "strategy": "see 'transferkit strategies'",
    "head_init": "random (a new head) or probe (LP-FT: start from the linear probe trained on the frozen features)",
    "lr": "peak learning rate (default: 1e-3 linear probe, 5e-5 text, 5e-4 images)",
    "out": "run directory to write",
    "lr_decay": "discriminative-lr: each lower layer group trains at this times the LR above it (default 0.8)",
    "unfreeze_every": "gradual-unfreeze: epochs between unfreezing successive layer groups (default 1)",
    "l2_sp": "L2-SP strength: pull the backbone towards its pretrained weights instead of weight decay",
    "l1": "L1 penalty strength on weight matrices",
    "lora_rank": "lora: adapter rank r (default 8)",
    "lora_alpha": "lora: scaling alpha (default 16)",
    "lora_dropout": "lora: dropout on the adapter input (default 0.1)",
    "adapter_targets": "lora/ia3: comma-separated Linear layer names to adapt (default: chosen per architecture)",
    "schedule": "linear, cosine, exponential, one-cycle or constant (after --warmup-ratio)",
    "optimizer": "adamw or sgd (with --momentum)",
    "accumulate": "add up the gradients of N batches per optimiser step (an N times larger effective batch)",
    "keep_layers": "keep only the K lowest layers of the model (transformer layers, EfficientNet blocks): a smaller, faster model",
    "target": "domain adaptation: unlabelled target-domain data (labels, if any, are ignored)",
    "target_test": "domain adaptation: labelled target-domain test file, used only to report",
    "adapt_method": "domain adaptation: source-only, target-bn, dan, dann, coral, cdan, mcc or im",
    "adapt_weight": "domain adaptation: weight of the transfer loss (ramped up from 0 during training)",
    "adapt_lr": "domain adaptation: learning rate of the domain discriminator (dann, cdan; default --head-lr or --lr)",
    "adapt_selection": ("domain adaptation: the epoch kept: dev (lowest DEV estimate of the target risk, no target "
                        "labels) or source-val (best --monitor on the source validation split)"),
    "teacher": "a finished run whose model teaches this one (knowledge distillation; same classes)",
    "distill_data": "distillation: extra unlabelled inputs (a table or folder) that the teacher labels for the student",
    "distill_alpha": "distillation: weight of the hard-label loss; 1 - alpha weighs the teacher's soft labels",
    "distill_temperature": "distillation: softmax temperature T of the soft labels",
    "class_weights": "none or balanced (loss weights inversely proportional to class frequency)",
    "logit_adjustment": ("train on logits + tau * log(class frequency) (logit-adjusted loss; 1.0 is usual): the model "
                         "ranks classes as if they were balanced. In federate, each client's own frequencies (label skew)"),
    "sampler": "shuffle or oversample (draw rare classes as often as common ones)",
    "mixup": "mixup Beta alpha (e.g. 0.2): inputs for images, pooled features for text",
    "noise": "std of Gaussian noise added to normalised image pixels while training",
    "token_mask": "fraction of text tokens replaced by the mask token while training (e.g. 0.1)",
    "image_augment": "comma-separated: flip, crop (reflect-pad and crop), affine (small rotation/scale/shift)",
    "ema_decay": ("validate, keep and save an exponential moving average of the weights, updated every step with "
                  "this decay (0.99: about the last 100 steps; timm's ModelEma)"),
    "patience": "early-stopping patience in epochs ('none' to train every epoch)",
    "checkpoint_every": "also checkpoint every N steps inside an epoch (epoch ends always checkpoint)",
    "on_divergence": "on a NaN/inf loss or gradient: 'stop' the run, or 'skip' the batch and halve the LR",
}


TASK_HELP = "which task of a multi-task run (its head over the shared backbone)"


def _add_multitask_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-task (docs/multitask.md)")
    group.add_argument("--task", dest="tasks", action="append", default=None, metavar="KEY=VALUE,...",
                       help="one task per option: name=N,train=FILE[,text_column=C,label_column=L,test=F,weight=W,...]")
    group.add_argument("--sharing", help="hard (one backbone, a head per task) or soft (a backbone per task, L2-tied)")
    group.add_argument("--weighting", help="equal, uncertainty, dwa, gradnorm or pcgrad (default equal)")
    group.add_argument("--task-sampling", help="round-robin, proportional or temperature (default round-robin)")
    group.add_argument("--sampling-temperature", help="temperature T of --task-sampling temperature (default 2)")
    group.add_argument("--sharing-strength", help="soft sharing: L2 penalty strength between the copies (default 0.1)")
    group.add_argument("--no-single-task", dest="single_task_baseline", action="store_const", const=False, default=None,
                       help="skip fine-tuning each task alone for the comparison")


def _add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML run config (e.g. RUN/config.yaml to replay a run); flags override it")
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        if f.name == "allow_pickle":
            parser.add_argument("--allow-pickle", dest="allow_pickle", action="store_const", const=True, default=None,
                                help="allow loading pickle (.bin/.pt) model weights, which can run code: trusted sources only")
            continue
        if f.name == "compile":
            parser.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                                help="compile the model with torch.compile (pays a compile time up front; see docs/benchmarks.md)")
            continue
        if f.name == "freeze_batchnorm":
            parser.add_argument("--freeze-batchnorm", dest="freeze_batchnorm", action="store_const", const=True, default=None,
                                help="keep every BatchNorm layer's pretrained running statistics (eval mode) while "
                                     "training: for small batches, where batch statistics are noisy")
            continue
        if f.name == "cache_frozen":
            parser.add_argument("--no-cache-frozen", dest="cache_frozen", action="store_const", const=False, default=None,
                                help="freeze-bottom: run the frozen layers every epoch instead of computing them once")
            continue
        if f.name == "ema_warmup":
            parser.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_const", const=False, default=None,
                                help="apply --ema-decay from the first step (by default the decay warms up as "
                                     "min(decay, (1+t)/(10+t)), which keeps it near 0.99 for the first ~1,000 steps)")
            continue
        if f.name == "baseline":
            parser.add_argument("--no-baseline", dest="baseline", action="store_const", const=False, default=None,
                                help="skip the linear-probe baseline")
            continue
        help_text = FIT_FLAGS_HELP.get(f.name, "") + (f" (default: {default})" if default not in (None, "") else "")
        parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text.strip())
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete --out first if it exists")


def _fit_config(args: argparse.Namespace) -> tuple[RunConfig | None, dict]:
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name) is not None}
    if args.resume:
        others = sorted(set(given) - {"out"})
        if others or args.config:
            raise UserError(f"--resume continues the run in --out with its saved config: drop {', '.join(others) or '--config'}")
        if "out" not in given:
            raise UserError("--resume needs --out RUN: the run directory to continue")
        return None, given
    if args.config:
        base = RunConfig.load(args.config).to_dict()
        return RunConfig.from_dict({**base, **given}, source=args.config), {}
    return RunConfig.from_dict(given, source="command line"), {}


MULTITASK_OPTIONS = ("sharing", "weighting", "task_sampling", "sampling_temperature", "sharing_strength",
                     "single_task_baseline")


def _multitask_requested(args: argparse.Namespace) -> bool:
    from .multitask.config import is_multitask_config

    if getattr(args, "tasks", None):
        return True
    if args.resume and args.out and (Path(args.out) / "config.yaml").is_file():
        return is_multitask_config(Path(args.out) / "config.yaml")
    return bool(args.config) and is_multitask_config(args.config)


def _composite_config(args: argparse.Namespace, config_class, options, parts: list[str] | None, parts_key: str,
                      flag: str, example: str):
    """The config of a run made of parts (tasks, clients): a resumed run's saved config, or the YAML of --config,
    then the RunConfig flags, the run's own options and the repeated ``flag KEY=VALUE,...`` parts."""
    from .config import parse_key_values, read_yaml

    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name) is not None}
    chosen = {k: getattr(args, k) for k in options if getattr(args, k, None) is not None}
    if args.resume:
        if set(given) - {"out"} or chosen or parts or args.config:
            raise UserError("--resume continues the run in --out with its saved config: drop the other options")
        if "out" not in given:
            raise UserError("--resume needs --out RUN: the run directory to continue")
        return config_class.load(Path(given["out"]) / "config.yaml")
    values = read_yaml(args.config) if args.config else {}
    if parts:
        values[parts_key] = [parse_key_values(part, flag, example) for part in parts]
    return config_class.from_dict({**values, **given, **chosen}, source=args.config or "command line")


def _cmd_fit_multitask(args: argparse.Namespace) -> int:
    from .multitask.config import MultiTaskConfig
    from .multitask.run import fit_multitask, multitask_table

    config = _composite_config(args, MultiTaskConfig, MULTITASK_OPTIONS, args.tasks, "tasks", "--task",
                               "name=sentiment,train=sst2.tsv,text_column=sentence")
    metrics = fit_multitask(config, resume=args.resume, overwrite=args.overwrite)
    print(multitask_table(metrics))
    print(f"run written to {config.out}: metrics.json, report.md, plots/tasks.png, model/ (predict with --task NAME)")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from .demo import results_table
    from .engine import distributed
    from .finetune import finetune

    if _multitask_requested(args):
        return _cmd_fit_multitask(args)
    config, overrides = _fit_config(args)
    metrics = finetune(config, resume=args.resume, overwrite=args.overwrite, **overrides)
    if not distributed.is_main():
        return 0  # process 0 of a data-parallel run reports
    out = config.out if config else overrides["out"]
    print(results_table(metrics))
    print(f"run written to {out}: metrics.json, report.html, model/")
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    if not args.target and not args.resume and not args.config:
        raise UserError("adapt needs --target FILE: unlabelled data from the domain to adapt to")
    code = _cmd_fit(args)
    out = args.out or (RunConfig.load(args.config).out if args.config else None)
    metrics_path = Path(out) / "metrics.json" if out else None
    if code == 0 and metrics_path is not None and metrics_path.is_file():
        adaptation = json.loads(metrics_path.read_text()).get("adaptation", {})
        target = adaptation.get("target_test")
        print(f"{adaptation.get('method')}: A-distance {adaptation.get('a_distance_before', 0):.2f} -> "
              f"{adaptation.get('a_distance_after', 0):.2f}"
              + (f"; DEV target risk {adaptation['dev']['risk']:.4f} (source validation loss "
                 f"{adaptation['dev']['source_val_loss']:.4f})" if "dev" in adaptation else "")
              + (f"; target test accuracy {target['accuracy']:.4f} ({target['examples']} examples)" if target else "")
              + f"; plot {Path(out) / adaptation.get('plot', '')}")
    return code


def _cmd_distill(args: argparse.Namespace) -> int:
    if not args.teacher and not args.resume and not args.config:
        raise UserError("distill needs --teacher RUN: a finished run whose model teaches the student")
    return _cmd_fit(args)


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from .lr_find import lr_find

    if args.resume or args.overwrite:
        raise UserError("lr-find writes only lr_find.png and lr_find.json: drop --resume/--overwrite")
    config, _ = _fit_config(args)
    if args.out is None:
        config = config.replace(out="runs/lr-find")
    summary = lr_find(config, steps=args.steps)
    print(f"suggested learning rate: {summary['suggested_lr']:.2e}  (loss vs LR plot: {summary['plot']})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo_config, results_table
    from .finetune import finetune

    config = demo_config(full=args.full, out=args.out)
    print(f"transferkit demo: {config.model} on Fashion-MNIST ({'full training set' if args.full else 'demo budget'})")
    metrics = finetune(config, overwrite=True)
    print()
    print(results_table(metrics))
    print(f"\nrun written to {config.out}: report.html, metrics.json, plots/, model/")
    return 0


def _read_for_model(model, path: str, args: argparse.Namespace, require_labels: bool):
    return model.read(path, text_column=args.text_column, image_column=args.image_column,
                      label_column=args.label_column, require_labels=require_labels)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .saved_model import load_run

    model = load_run(args.run, args.task)
    report = model.evaluate(_read_for_model(model, args.test, args, require_labels=True))
    print(f"accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  ({args.test})")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(f"full report written to {args.output}")
    return 0


def _describe_input(inputs, index: int) -> str:
    """What a prediction row was about: the text, the image path, or the image's index in an IDX file."""
    if isinstance(inputs, list):
        return inputs[index]
    paths = getattr(inputs, "paths", None)
    return str(paths[index]) if paths is not None else f"image {index}"


def _cmd_predict(args: argparse.Namespace) -> int:
    from .saved_model import load_run

    model = load_run(args.run, args.task)
    examples = _read_for_model(model, args.input, args, require_labels=False)
    probabilities = model.predict_proba(examples.inputs)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "input", "label", *[f"p_{c}" for c in model.classes]])
        for i, row in enumerate(probabilities):
            writer.writerow([i, _describe_input(examples.inputs, i), model.classes[int(row.argmax())],
                             *[f"{p:.6f}" for p in row]])
    print(f"{len(probabilities)} predictions written to {output}")
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    from .ranking import rank, rank_table

    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name) is not None}
    if "model" in given:
        raise UserError("rank compares several candidates: give them as --models a,b,c (not --model)")
    if "train" not in given:
        raise UserError("rank needs the data: --data FILE (a table, image folder, IDX file or 'fashion-mnist')")
    out = given.pop("out", "runs/rank")
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()] if args.estimators else None
    lrs = None
    if args.validate_lr is not None:
        try:
            lrs = [float(v) for v in args.validate_lr.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--validate-lr is '{args.validate_lr}': give comma-separated learning rates, "
                            f"e.g. 1e-4,3e-4,1e-3") from None
    result = rank([m.strip() for m in args.models.split(",")], sample=args.sample, validate=args.validate,
                  validate_examples=args.validate_examples, validate_lrs=lrs,
                  validate_seeds=args.validate_seeds, by=args.by,
                  estimators=estimators, out=out, overwrite=args.overwrite, **given)
    print(rank_table(result))
    print(f"\nwritten to {out}: rank.json, rank.png (score vs cost, Pareto front marked)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .deploy.export import export_onnx

    result = export_onnx(args.run, args.out, tolerance=args.tolerance, opset=args.opset, task=args.task)
    print(f"exported {result['path']} ({result['bytes'] / 1e6:.1f} MB, opset {result['opset']}, {result['exporter']} "
          f"exporter{', adapters merged' if result['adapters_merged'] else ''}); onnxruntime matches PyTorch to "
          f"{result['max_abs_diff']:.2g} (tolerance {result['tolerance']:g}) on batch shapes {result['checked_shapes']}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .deploy.server import ServeLimits, serve

    limits = ServeLimits(max_items=args.max_items, max_text_chars=args.max_text_chars,
                         max_body_bytes=args.max_body_mb << 20)
    serve(args.run, host=args.host, port=args.port, runtime=args.runtime, onnx_path=args.onnx,
          max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, limits=limits, token=args.token,
          log_level=args.log_level, task=args.task)
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from .ensemble import build_ensemble

    metrics = build_ensemble(args.runs, method=args.method, val=args.val, test=args.test, out=args.out,
                             text_column=args.text_column, image_column=args.image_column,
                             label_column=args.label_column, overwrite=args.overwrite)
    print(f"{'model':50s} {'test accuracy':>13s} {'macro-F1':>9s}")
    for member in metrics["members"]:
        print(f"{member['run'][-50:]:50s} {member['accuracy']:13.4f} {member['macro_f1']:9.4f}")
    print(f"{'ensemble (' + args.method + ')':50s} {metrics['test']['accuracy']:13.4f} {metrics['test']['macro_f1']:9.4f}")
    gain = metrics["gain_over_best_member"]
    print(f"\n{'+' if gain >= 0 else ''}{100 * gain:.2f} pts over the best member; run written to {args.out}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    result = pretrain(args.model, args.text_data, args.out, text_column=args.text_column, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, mask_probability=args.mask_probability,
                      max_length=args.max_length, max_examples=args.max_examples, val_fraction=args.val_fraction,
                      seed=args.seed, precision=args.precision, head_warmup_epochs=args.head_warmup_epochs,
                      head_warmup_lr=args.head_warmup_lr, allow_pickle=args.allow_pickle, resume=args.resume,
                      overwrite=args.overwrite)
    head = "a new masked-LM head (the checkpoint had none)" if result["new_mlm_head"] else "the checkpoint's masked-LM head"
    if result["head_warmup"]:
        head += f", warmed up alone for {result['head_warmup']['epochs']} epoch(s) (loss {result['head_warmup']['val_loss_after']:.4f})"
    print(f"masked-LM pre-training on {result['train']} texts ({result['val']} held out), {head}: validation loss "
          f"{result['val_loss_before']:.4f} -> {result['val_loss_after']:.4f} (perplexity "
          f"{result['val_perplexity_before']:.1f} -> {result['val_perplexity_after']:.1f})"
          + (f"; {result['empty_lines_skipped']} empty lines skipped" if result["empty_lines_skipped"] else ""))
    print(f"encoder written to {args.out}: fine-tune it with 'transferkit fit --model {args.out} ...'")
    return 0


FEDERATED_HELP = {
    "partitioner": "split --train across simulated clients: iid, dirichlet (--alpha) or pathological (--classes-per-client)",
    "num_clients": "number of simulated clients (default 3)",
    "alpha": "Dirichlet concentration: small = each client sees few classes (default 0.5)",
    "classes_per_client": "pathological partitioner: classes per client (default 2)",
    "aggregator": "fedavg, fedavgm, fedprox, fedadam, fedmedian, fedtrimmedavg or krum (default fedavg)",
    "proximal_mu": "fedprox: strength mu of the proximal term (default 0.01)",
    "trimmed_beta": "fedtrimmedavg: share trimmed at each end (default 0.2)",
    "krum_malicious": "krum: number of malicious clients to tolerate (default 1)",
    "server_lr": "fedadam, fedavgm: server learning rate (default 0.01 for fedadam, 1.0 for fedavgm)",
    "server_momentum": "fedavgm: server momentum (default 0.9)",
    "max_rounds": "stop after this many rounds (default 10)",
    "local_epochs": "epochs each client trains per round (default 1; 1/k, e.g. 0.25: each round trains on the next k-th of its data)",
    "min_delta": "a round improves when mean client validation accuracy gains this much (default 0.001)",
    "round_patience": "stop after this many rounds without improvement ('none': run max_rounds; default 3)",
    "fraction_train": "share of clients sampled each round (default 1.0)",
    "min_clients": "fewest clients a round runs with; Flower waits until that many are connected (default 2)",
    "personal": "what each client keeps to itself between rounds: none, head (FedPer) or batchnorm (FedBN) (default none)",
    "personalise_epochs": "after federation each client fine-tunes the global model this long (default 1; 0: skip)",
    "personalise_lr_factors": ("comma-separated multiples of --lr the personalisation tries, each from the global model; "
                               "each client keeps the best on its own validation split (default 1)"),
    "client_optimizer_state": "reset: each round's local training starts a fresh AdamW; keep: each client keeps its "
                              "AdamW moments and step count between rounds, on the client (default reset)",
    "round_schedule": "how the clients' LR decays across rounds, over --max-rounds: linear, cosine, exponential or "
                      "constant (default constant); inside a round the recipe's --schedule applies (default constant)",
    "local_only": "also train a model on each client's data alone, for the report (default true)",
    "client_cpus": "CPUs Ray reserves per simulated client (default 1)",
    "poisoned_clients": "attack simulation: comma-separated client indices that send scaled updates (robustness checks)",
    "poison_scale": "attack simulation: the poisoned update is global + SCALE * (local - global) (default -10)",
    "round_timeout_s": "seconds a round waits for the clients' replies before going on without the silent ones (default 3600)",
    "dp_clipping_norm": "local differential privacy: clip each client's update to this L2 norm (with --dp-epsilon)",
    "dp_epsilon": "local differential privacy: privacy budget per round; Gaussian noise grows as it shrinks",
    "dp_delta": "local differential privacy: failure probability delta (default 1e-5)",
    "dp_sensitivity": "local differential privacy: sensitivity of the clipped update (default: the clipping norm)",
}


def _cmd_federate(args: argparse.Namespace) -> int:
    from .federated.config import FederatedConfig
    from .federated.run import federate, federated_table

    config = _composite_config(args, FederatedConfig, FEDERATED_HELP, args.clients, "clients", "--client",
                               "name=site1,train=site1.csv,text_column=text")
    metrics = federate(config, resume=args.resume, overwrite=args.overwrite, superlink=args.superlink,
                       insecure=args.insecure, root_certificates=args.root_certificates)
    print(federated_table(metrics))
    print(f"run written to {config.out}: metrics.json, report.md, plots/, model/ (the global model)")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .backbones.registry import packaged_models

    for name, (modality, summary) in packaged_models().items():
        print(f"{name:20s} {modality:6s} {summary}")
    print("also: a local transformers checkpoint folder, or a Hugging Face hub name (needs the internet once)")
    return 0


def _cmd_strategies(args: argparse.Namespace) -> int:
    from .strategies import STRATEGIES

    for name, cls in sorted(STRATEGIES.items()):
        print(f"{name:15s} {cls.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferkit", description="Fine-tune pretrained models on your labelled data.")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fine-tune a pretrained model (one task, or several with --task) and write a run directory")
    _add_fit_arguments(fit)
    # `rank` and `distill` name their data --data: the same word works here.
    fit.add_argument("--data", dest="train", default=None, help="the labelled training data (same as --train)")
    _add_multitask_arguments(fit)
    fit.set_defaults(func=_cmd_fit)

    adapt = commands.add_parser("adapt", help="fine-tune on a labelled source domain while adapting to an unlabelled target")
    _add_fit_arguments(adapt)
    adapt.add_argument("--source", dest="train", default=None, help="labelled source-domain data (same as --train)")
    adapt.add_argument("--method", dest="adapt_method", default=None,
                       help="source-only, target-bn, dan, dann, coral, cdan, mcc or im (same as --adapt-method)")
    adapt.set_defaults(func=_cmd_adapt)

    distill = commands.add_parser("distill", help="train a (smaller) student model from a fine-tuned teacher run")
    _add_fit_arguments(distill)
    distill.add_argument("--student", dest="model", default=None, help="the student model (same as --model)")
    distill.add_argument("--data", dest="train", default=None, help="the labelled training data (same as --train)")
    distill.set_defaults(func=_cmd_distill)

    finder = commands.add_parser("lr-find", help="LR range test: plot loss vs learning rate and suggest one")
    _add_fit_arguments(finder)
    finder.add_argument("--data", dest="train", default=None, help="the labelled training data (same as --train)")
    finder.add_argument("--steps", type=int, default=100, help="training steps of the range test")
    finder.set_defaults(func=_cmd_lr_find)

    demo = commands.add_parser("demo", help="EfficientNet-Lite0 on Fashion-MNIST: linear probe vs fine-tuned")
    demo.add_argument("--full", action="store_true", help="train on the full 60,000 images (slower)")
    demo.add_argument("--out", default="runs/demo", help="run directory (replaced if it exists)")
    demo.set_defaults(func=_cmd_demo)

    for name, helptext, file_flag in (("evaluate", "score a finished run on a labelled file", "--test"),
                                      ("predict", "predict labels and class probabilities for a file", "--input")):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("run", help="a finished run directory")
        sub.add_argument(file_flag, required=True, help="a table, image folder or IDX file" + (
            "; or one image file, or a flat folder of images" if name == "predict" else ""))
        sub.add_argument("--text-column", help="default: the run's training text column, when the file has it")
        sub.add_argument("--image-column", help="default: the run's training image column, when the file has it")
        sub.add_argument("--label-column", help="default: the run's training label column, else 'label'")
        sub.add_argument("--task", help=TASK_HELP)
        sub.add_argument("--output", required=name == "predict",
                         help="CSV of predictions" if name == "predict" else "write the full report as JSON")
        sub.set_defaults(func=_cmd_evaluate if name == "evaluate" else _cmd_predict)

    ranker = commands.add_parser("rank", help="rank candidate pretrained models for your data before fine-tuning")
    _add_fit_arguments(ranker)
    ranker.add_argument("--data", dest="train", default=None, help="the labelled data to rank for (same as --train)")
    ranker.add_argument("--models", required=True, help="comma-separated candidates; random:NAME is NAME with random weights, "
                        "NAME@layers=K is NAME cut to its K lowest layers (transformer layers, EfficientNet blocks)")
    ranker.add_argument("--sample", type=int, default=1000, help="stratified sample of the data to score on (default 1000)")
    ranker.add_argument("--validate", type=int, default=0,
                        help="fine-tune the top K (and the bottom one) with --epochs and report rank correlations")
    ranker.add_argument("--validate-examples", type=int, default=None,
                        help="training examples for those fine-tunes (default: --sample)")
    ranker.add_argument("--validate-lr", default=None,
                        help="comma-separated learning rates: each validated candidate is fine-tuned at each and keeps "
                             "the one its validation accuracy chooses (default: --lr alone)")
    ranker.add_argument("--validate-seeds", type=int, default=1,
                        help="run the chosen rate with N seeds and correlate with the mean accuracy (default 1): "
                             "candidates within a seed's spread of each other are otherwise ordered by chance")
    ranker.add_argument("--by", default="nleep",
                        help="estimator that orders the table (default nleep: the best rank correlation in docs/benchmarks.md)")
    ranker.add_argument("--estimators", help="comma-separated estimators (default: all of nleep, logme, hscore, knn, leep, nce)")
    ranker.set_defaults(func=_cmd_rank)

    ensembler = commands.add_parser("ensemble", help="combine finished runs by voting, averaging, stacking or a weight soup")
    ensembler.add_argument("runs", nargs="+", help="two or more finished run directories with the same classes")
    # The method list comes from the combiner registry when the command runs (importing it here would make
    # every `transferkit --help` load torch).
    ensembler.add_argument("--method", default="average",
                           help="vote (hard voting), average (probabilities; the default, it needs no --val), weighted (weights fitted on --val), "
                                "stack (a meta-learner fitted on --val) or soup (greedy weight soup, one backbone)")
    ensembler.add_argument("--val", help="labelled validation file: what weighted, stack and soup learn from")
    ensembler.add_argument("--test", required=True, help="labelled test file, predicted once to report")
    ensembler.add_argument("--out", required=True, help="run directory to write")
    ensembler.add_argument("--text-column")
    ensembler.add_argument("--image-column")
    ensembler.add_argument("--label-column", help="default: the first member's training label column, else 'label'")
    ensembler.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ensembler.set_defaults(func=_cmd_ensemble)

    pretrainer = commands.add_parser("pretrain", help="continue masked-LM pre-training of a text encoder on unlabelled domain text")
    pretrainer.add_argument("--model", required=True, help="a text encoder: minilm-l6, a local checkpoint folder or a hub name")
    pretrainer.add_argument("--text-data", "--data", dest="text_data", required=True,
                            help="unlabelled text: a .txt file (one text per line) or a table (--data is the same)")
    pretrainer.add_argument("--text-column", help="the text column of a table")
    pretrainer.add_argument("--out", required=True, help="folder for the adapted encoder (a transformers checkpoint)")
    pretrainer.add_argument("--epochs", type=int, default=1)
    pretrainer.add_argument("--batch-size", type=int, default=32)
    pretrainer.add_argument("--lr", type=float, default=5e-5)
    pretrainer.add_argument("--mask-probability", type=float, default=0.15, help="share of tokens masked (default 0.15)")
    pretrainer.add_argument("--max-length", type=int, help="tokens per text (default: the model's, at most 256)")
    pretrainer.add_argument("--max-examples", type=int, help="use only the first N texts")
    pretrainer.add_argument("--val-fraction", type=float, default=0.05, help="texts held out for the validation loss")
    pretrainer.add_argument("--seed", type=int, default=0)
    pretrainer.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    pretrainer.add_argument("--head-warmup-epochs", type=int,
                            help="epochs that train the masked-LM head alone, encoder frozen (default: 1 for a new head, else 0)")
    pretrainer.add_argument("--head-warmup-lr", type=float, default=1e-3, help="learning rate of the head warm-up")
    pretrainer.add_argument("--allow-pickle", action="store_true", help="allow pickle weights (trusted sources only)")
    pretrainer.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    pretrainer.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    pretrainer.set_defaults(func=_cmd_pretrain)

    federator = commands.add_parser("federate", help="federated fine-tuning on Flower: clients keep their data (simulation, or --superlink)")
    _add_fit_arguments(federator)
    group = federator.add_argument_group("federated (docs/federated.md)")
    group.add_argument("--client", dest="clients", action="append", default=None, metavar="KEY=VALUE,...",
                       help="one client's own dataset per option: name=N,train=FILE[,text_column=C,test=F] (instead of --train)")
    for name, text in FEDERATED_HELP.items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=text)
    deployment = federator.add_argument_group("Flower Deployment Engine (instead of the simulation; docs/federated.md)")
    deployment.add_argument("--superlink", help="host:port of a running SuperLink's Control API (e.g. 127.0.0.1:9093); "
                                                "its SuperNodes are the clients")
    deployment.add_argument("--insecure", action="store_true", help="talk to the SuperLink without TLS (loopback, tests)")
    deployment.add_argument("--root-certificates", help="CA certificate (PEM) of a TLS-enabled SuperLink")
    federator.set_defaults(func=_cmd_federate)

    exporter = commands.add_parser("export", help="export a finished run's model to ONNX, checked against PyTorch")
    exporter.add_argument("run", help="a finished run directory")
    exporter.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    exporter.add_argument("--out", help="the .onnx file to write (default RUN/model.onnx)")
    exporter.add_argument("--tolerance", type=float, default=1e-4,
                          help="largest allowed absolute logit difference from PyTorch (default 1e-4)")
    exporter.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    exporter.add_argument("--task", help=TASK_HELP)
    exporter.set_defaults(func=_cmd_export)

    server = commands.add_parser("serve", help="serve a finished run over HTTP with dynamic batching")
    server.add_argument("run", help="a finished run directory")
    server.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                        help="torch (the run's model) or onnx (RUN/model.onnx from 'transferkit export')")
    server.add_argument("--onnx", help="the .onnx file for --runtime onnx (default RUN/model.onnx)")
    server.add_argument("--max-batch-size", type=int, default=32,
                        help="inputs per forward pass across concurrent requests (1 turns batching off)")
    server.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a batch waits for more requests before it runs (default 5)")
    server.add_argument("--max-items", type=int, default=64, help="inputs per request (default 64)")
    server.add_argument("--max-text-chars", type=int, default=20_000, help="characters per text (default 20000)")
    server.add_argument("--max-body-mb", type=int, default=16, help="request body size limit in MiB (default 16)")
    server.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (default: $TRANSFERKIT_TOKEN if set)")
    server.add_argument("--task", help=TASK_HELP)
    server.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    server.set_defaults(func=_cmd_serve)

    commands.add_parser("models", help="list the packaged pretrained models").set_defaults(func=_cmd_models)
    commands.add_parser("strategies", help="list the fine-tuning strategies").set_defaults(func=_cmd_strategies)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .engine.cpu_memory import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()  # every command runs tensors in this process (serve, predict, federate too)
    try:
        return args.func(args)
    except UserError as error:
        print(f"transferkit: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if error.name not in ("torch", "transformers"):
            raise
        # A serving-only install (ONNX runtime) has neither; every other command needs both.
        print(f"transferkit: error: 'transferkit {args.command}' needs {error.name}, which is not installed: "
              f"pip install torch transformers (only 'transferkit serve --runtime onnx' works without them)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntransferkit: interrupted; continue with 'transferkit fit --out RUN --resume'", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
