"""The ``rptq`` command line: parse, validate, call the pipeline, print. Nothing else lives here."""
from __future__ import annotations

import copy
import contextlib
import functools
import json
import signal
import sys
import time
import traceback
from pathlib import Path

import click

from . import __version__
from .config import KV_GRIDS, MODES
from .errors import RptqError
from .points import REORDER_POINT_NAMES

CALIB_DEFAULTS = {"nsamples": 128, "seed": 2}
MIN_CALIB_SEQLEN = 16  # shorter windows calibrate on little more than the first tokens' outliers


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, schedulers), raised like Ctrl-C so that every cleanup path runs for it too."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt():
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(fn):
    """User errors become one line on stderr and exit code 2, never a traceback; a bug in rptq keeps its
    traceback and says so. SIGINT and SIGTERM stop the command, leaving no partial output (130, 143)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except RptqError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except ValueError as exc:
            fix = _fix_for_library_error(exc)
            if fix is None:
                _report_bug()
            click.echo(f"error: {exc}; {fix}", err=True)
            sys.exit(2)
        except Terminated:
            click.echo("error: terminated (SIGTERM); no partial output was left", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("error: interrupted (SIGINT); no partial output was left", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception:
            _report_bug()
    return wrapper


def _report_bug():
    """The traceback of the exception being handled, a line saying it is rptq's fault, exit code 1."""
    traceback.print_exc()
    click.echo(f"error: this is a bug in rptq {__version__}, not a problem with your input; please report "
               "it with the command line and the traceback above", err=True)
    sys.exit(1)


def _library_error_fixes() -> dict:
    """The fix for each ValueError that the quantization library (quant/) raises about what the pipeline gave it,
    keyed by the function that raises it: the library says what is wrong and knows no flags; the CLI names the fix.
    Only loaded modules are asked (an error cannot come from a module that was never imported)."""
    gptq, weights = sys.modules.get("rptq_cli.quant.gptq"), sys.modules.get("rptq_cli.quant.weights")
    fixes = {}
    if gptq is not None:
        fixes[gptq.check_finite_hessian] = "calibrate in float32 (--dtype float32)"
        fixes[gptq.damped_inverse_cholesky] = ("calibrate on more tokens (--nsamples, --seqlen) or quantize the "
                                               "weights with --weight-quantizer rtn")
    if weights is not None:
        fixes[weights.check_cluster_sizes] = ("the clusters of --stats do not fit this model and config: re-run "
                                              "`rptq calibrate` for it, or leave out --stats")
    return fixes


def _fix_for_library_error(exc: ValueError) -> str | None:
    """The fix to name for ``exc``, when a function of :func:`_library_error_fixes` raised it; None otherwise (a
    ValueError from anywhere else is a bug in rptq and keeps its traceback)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    raiser = tb.tb_frame.f_code if tb is not None else None
    return next((fix for function, fix in _library_error_fixes().items() if function.__code__ is raiser), None)


def _prepare_output(output, force, *, is_ours, kind, directory, sources=()) -> None:
    """Before any work: refuse a path we may not replace, check writability, clear killed runs' leftovers."""
    from .outputs import check_output, remove_stale_temporaries
    check_output(output, force, is_ours=is_ours, kind=kind, directory=directory, sources=sources)
    removed, unknown = remove_stale_temporaries(output)
    for stale in removed:
        click.echo(f"note: removed {stale}, left by an earlier run that was killed", err=True)
    for other in unknown:
        click.echo(f"note: {other} looks like the temporary of an earlier rptq run; remove it if no rptq is "
                   f"writing {output}", err=True)


def _is_results_json(path: Path) -> bool:
    """A results file `rptq eval --json` wrote (the only kind of file `eval --force` replaces)."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        return isinstance(data, dict) and {"model", "quantization", "results"} <= set(data)
    return False


def _is_report_json(path: Path) -> bool:
    """An error report `rptq eval --report` wrote."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        return isinstance(data, dict) and {"label", "windows", "points"} <= set(data)
    return False


def verify_option(fn):
    return click.option("--no-verify", is_flag=True,
                        help="Skip the SHA-256 check of a checkpoint's files (one extra read; slow on huge models). "
                             "Value-range checks still run.")(fn)


def model_options(fn):
    fn = click.option("--dtype", default="auto", show_default=True,
                      type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
                      help="Compute dtype (auto: float32 on CPU, float16 on GPU).")(fn)
    fn = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")(fn)
    return fn


def placement_options(fn):
    fn = click.option("--max-memory", default=None, metavar="DEV=SIZE,...",
                      help="Budgets for --device-map auto/balanced, e.g. 0=70GiB,cpu=100GiB; disk=SIZE allows "
                           "offloading layers to a temporary folder [free GPU memory less 10%, available RAM].")(fn)
    fn = click.option("--device-map", default=None, metavar="auto|balanced|FILE.json",
                      help="Spread the model over GPUs, CPU and disk (accelerate): auto fills GPU 0, then 1, …, "
                           "then the CPU; balanced gives every GPU as many layers; FILE.json maps module names to "
                           "0, 1, …, cpu or disk. Layers on cpu/disk run on the first GPU. Instead of --device.")(fn)
    return fn


def _placement(device, device_map, max_memory):
    """(device map or None, budgets or None, the device that runs the model), every flag checked before loading."""
    import torch

    from .loading import main_device, parse_max_memory, read_device_map, resolve_device
    if device_map is None:
        if max_memory is not None:
            raise RptqError("--max-memory budgets a --device-map; add --device-map auto (or balanced)")
        return None, None, resolve_device(device)
    source = click.get_current_context().get_parameter_source("device")
    if source not in (None, click.core.ParameterSource.DEFAULT):
        raise RptqError("--device and --device-map both place the model; pass one of them")
    placement = read_device_map(device_map)
    if isinstance(placement, dict):
        if max_memory is not None:
            raise RptqError(f"--device-map {device_map} places every module itself; --max-memory applies to "
                            "auto and balanced: drop it")
        return placement, None, main_device(placement.values())
    budgets = parse_max_memory(max_memory) if max_memory is not None else None
    gpus = budgets if budgets is not None else range(torch.cuda.device_count())
    return placement, budgets, main_device(gpus)


@contextlib.contextmanager
def _placed(net, device, device_map, budgets, device_map_spec, max_memory_spec):
    """``net`` on ``device``, or spread by ``device_map`` (see :func:`loading.place_model`) for the duration; yields
    the device that runs it. Layers placed on disk live in a temporary folder (under $TMPDIR), removed on the way
    out."""
    if device_map is None:
        net.to(device)
        yield device
        return
    import tempfile

    from .loading import describe_device_map, place_model
    from .models import family_for
    family = family_for(net.config)
    may_offload = "disk" in (device_map.values() if isinstance(device_map, dict) else budgets or ())
    with tempfile.TemporaryDirectory(prefix="rptq-offload-") if may_offload else contextlib.nullcontext() as folder:
        main = place_model(net, family, device_map, budgets, offload_dir=folder, spec=device_map_spec,
                           max_memory_spec=max_memory_spec)
        click.echo(f"device map ({device_map_spec}): {describe_device_map(net, family, net.hf_device_map)}", err=True)
        yield main


def calib_options(fn):
    fn = click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1),
                      help="Windows per forward pass (calibration and evaluation).")(fn)
    fn = click.option("--seed", type=int, default=None, help="Seed of the window draw and KMeans [2].")(fn)
    fn = click.option("--seqlen", type=click.IntRange(1), default=None,
                      help="Tokens per window [min(2048, model max positions)].")(fn)
    fn = click.option("--nsamples", type=click.IntRange(1), default=None, help="Calibration windows [128].")(fn)
    fn = click.option("--calib-path", type=click.Path(dir_okay=False), default=None,
                      help="Calibration text file (.txt, .jsonl with 'text', .parquet).")(fn)
    fn = click.option("--calib-dataset", type=click.Choice(["wikitext2", "ptb", "c4", "mix"]), default=None,
                      help="Calibration dataset from the hub (train split) [mix].")(fn)
    return fn


def config_options(fn):
    """The flags that make a QuantConfig (a preset and what overrides it), handed to the command as one dict,
    ``quant`` (click's parameter names → values; None: not given), so that a new flag is one option here."""
    @functools.wraps(fn)
    def command(*args, **kwargs):
        return fn(*args, quant={name: kwargs.pop(name) for name in names}, **kwargs)

    opts = [
        click.option("--config", "preset", default=None, help="Preset from rptq_cli/configs/ (w4a8, w4a4kv, ...); flags override."),
        click.option("--wbits", type=int, default=None, help="Weight bits: 2, 3, 4, 8 or 16."),
        click.option("--abits", type=int, default=None, help="Activation bits: 3, 4, 8 or 16."),
        click.option("--kv-only", is_flag=True, default=None, help="Quantize only K and V at --abits."),
        click.option("--mode", type=click.Choice(list(MODES)), default=None,
                     help="; ".join(f"{name}: {text}" for name, text in MODES.items()) + "."),
        click.option("--weight-quantizer", type=click.Choice(["gptq", "rtn"]), default=None),
        click.option("--weight-groups", default=None, help="cluster (default), channel or a group size like 128."),
        click.option("--clusters", default=None, help="Clusters per point, e.g. R1=32,R2=4,R3=4,R4=32,R5=32."),
        click.option("--no-reorder", is_flag=True, default=False, help="One cluster per point (per-tensor baseline)."),
        click.option("--cluster-multiple", type=int, default=None,
                     help="Round cluster sizes to multiples of this many channels: 16 lets the AVX2 GEMV read each "
                          "weight chunk once, but merges the one-channel outlier clusters (SmolLM2 W4A16: +18% "
                          "ppl, README) [1: KMeans' sizes]."),
        click.option("--act-clip", type=click.Choice(["minmax", "mse"]), default=None,
                     help="Activation ranges: calibrated min/max or the MSE-best clipped range [mse]."),
        click.option("--kv-grid", type=click.Choice(list(KV_GRIDS)), default=None,
                     help="; ".join(f"{name}: {text}" for name, text in KV_GRIDS.items()) + " [static]."),
        click.option("--head-bits", type=int, default=None,
                     help="lm_head: 8 packs it at 8 bits (half the bytes a CPU decode step streams for it; the "
                          "embeddings stay float16), 16 keeps it float16 [16]."),
    ]
    before = len(getattr(command, "__click_params__", []))
    for opt in reversed(opts):
        command = opt(command)
    names = [param.name for param in command.__click_params__[before:]]
    return command


def quant_options(fn):
    """:func:`config_options` and a stats file to take the clusters and calibration data from."""
    fn = click.option("--stats", "stats_path", type=click.Path(dir_okay=False), default=None,
                      help="Stats file from `rptq calibrate`: clusters and, by default, its calibration data.")(fn)
    return config_options(fn)


def _config_flags(quant: dict) -> dict:
    """The quantization flags (:func:`config_options`' dict) as :func:`config.build_config` takes them."""
    from .config import parse_clusters
    given = {name: value for name, value in quant.items() if name not in ("preset", "clusters", "no_reorder")}
    return dict(given, clusters=parse_clusters(quant["clusters"]) if quant["clusters"] else None,
                reorder=False if quant["no_reorder"] else None)


def _quant_config(quant: dict):
    """The QuantConfig the flags ask for; None when they quantize nothing (or none is given)."""
    from .config import build_config
    given = _config_flags(quant)
    if quant["preset"] is None and all(v is None for v in given.values()):
        return None
    config = build_config(quant["preset"], **given)
    return config if (config.quantizes_weights or config.quantizes_acts) else None


def _calibration(tokenizer, model_config, stats, calib_dataset, calib_path, nsamples, seqlen, seed):
    """Calibration windows: from the flags, else the source recorded in the stats file, else the defaults."""
    from .data import calibration_windows
    from .loading import default_seqlen
    recorded = (stats.meta.get("data") or {}) if stats is not None else {}
    if calib_dataset is None and calib_path is None and recorded.get("source"):
        source = recorded["source"]
        if source.startswith("file:"):
            calib_path = source[len("file:"):]
        else:
            calib_dataset = source
    if calib_dataset is not None and calib_path is not None:
        raise RptqError("give --calib-dataset or --calib-path, not both")
    if calib_dataset is None and calib_path is None:
        calib_dataset = "mix"
    nsamples = nsamples or recorded.get("nsamples") or CALIB_DEFAULTS["nsamples"]
    seqlen = seqlen or recorded.get("seqlen") or default_seqlen(model_config)
    seed = seed if seed is not None else recorded.get("seed", CALIB_DEFAULTS["seed"])
    if seqlen < 2:
        raise RptqError(f"--seqlen {seqlen} gives calibration windows of a single token, which hold no context; pass "
                        f"--seqlen {MIN_CALIB_SEQLEN} or more (default {default_seqlen(model_config)})")
    if seqlen < MIN_CALIB_SEQLEN:
        click.echo(f"warning: calibration windows of {seqlen} tokens see little context; activation ranges may not "
                   f"match real inputs (use --seqlen {MIN_CALIB_SEQLEN} or more)", err=True)
    tokens, provenance = calibration_windows(tokenizer, dataset=calib_dataset, path=calib_path,
                                             nsamples=nsamples, seqlen=seqlen, seed=seed)
    if recorded.get("sha256") and recorded.get("source") == provenance["source"] \
            and recorded["sha256"] != provenance["sha256"]:
        click.echo(f"warning: the calibration text of {provenance['source']} changed since the stats were "
                   "recorded (sha256 differs)", err=True)
    return tokens, provenance


def _check_seqlen(seqlen, model_config):
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if seqlen is not None and max_pos and seqlen > max_pos:
        raise RptqError(f"--seqlen {seqlen} exceeds the model's {max_pos} positions; use --seqlen {max_pos} or less")


class _RecordingGroup(click.Group):
    """Keeps the arguments as given (ctx.meta["argv"]): checkpoints and model cards record the exact command."""

    def parse_args(self, ctx, args):
        ctx.meta["argv"] = [str(a) for a in args]
        return super().parse_args(ctx, args)


def _command_line(drop: tuple[str, ...] = ()) -> str:
    """The command as typed (recorded by _RecordingGroup), without the flags in ``drop``."""
    from .model_card import command_line
    argv = click.get_current_context().meta.get("argv")
    return command_line([a for a in argv if a not in drop] if argv is not None else None)


@click.group(cls=_RecordingGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="rptq")
def main():
    """RPTQ: reorder-based post-training quantization of LLMs, run on real packed kernels."""


@main.command()
@click.argument("model")
@calib_options
@model_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Stats file to write.")
@click.option("--force", is_flag=True, help="Replace an existing stats file (only one rptq wrote).")
@_run
def calibrate(model, calib_dataset, calib_path, nsamples, seqlen, seed, batch_size, device, dtype, output, force):
    """Record per-channel (min, max) at every reorder point, one layer at a time."""
    from .calibrate import LayerRunner, collect_stats
    from .stats_file import StatsFile, is_stats_file, stats_metadata
    from .loading import open_model, resolve_device, resolve_dtype
    _prepare_output(output, force, is_ours=is_stats_file, kind="stats file", directory=False, sources=(model,))
    device = resolve_device(device)
    streamed = open_model(model, resolve_dtype(dtype, device))  # layers are read one at a time
    tokenizer, family, net_config = streamed.tokenizer, streamed.family, streamed.model.config
    _check_seqlen(seqlen, net_config)
    tokens, provenance = _calibration(tokenizer, net_config, None, calib_dataset, calib_path, nsamples, seqlen, seed)
    start = time.perf_counter()
    stats = collect_stats(LayerRunner(streamed, family, tokens, device, batch_size))
    StatsFile(stats, stats_metadata(model, net_config, provenance)).save(output)
    click.echo(f"wrote {output}: {len(stats)} layers, {tokens.shape[0]} windows of {tokens.shape[1]} tokens "
               f"from {provenance['source']} ({time.perf_counter() - start:.1f}s)")


@main.command(name="eval")
@click.argument("model")
@click.option("--task", "tasks", multiple=True, type=click.Choice(["wikitext", "ptb", "c4"]),
              help="Perplexity task (repeatable) [wikitext, unless only --lm-eval-task is given].")
@click.option("--data-path", "data_paths", multiple=True, type=click.Path(dir_okay=False),
              help="Local text for the task instead of the hub (one per --task, in order).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results as JSON.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write per-quantizer error diagnostics (relative MSE, clipped tokens, extremes, KL vs FP) as JSON.")
@click.option("--force", is_flag=True, help="Replace an existing --json / --report file (only one rptq wrote).")
@click.option("--lm-eval-task", "lm_eval_tasks", multiple=True,
              help="lm-evaluation-harness task (repeatable), e.g. piqa, arc_easy: acc and acc_norm.")
@click.option("--lm-eval-include", type=click.Path(file_okay=False), default=None,
              help="Folder of your own lm-eval task YAMLs (e.g. local json data_files).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Documents per lm-eval task [all].")
@click.option("--num-fewshot", type=click.IntRange(0), default=None, help="Few-shot examples per lm-eval task [0].")
@verify_option
@quant_options
@calib_options
@model_options
@placement_options
@_run
def eval_cmd(model, tasks, data_paths, json_path, report_path, force, lm_eval_tasks, lm_eval_include, limit,
             num_fewshot, no_verify, quant, stats_path, calib_dataset, calib_path, nsamples, seqlen, seed,
             batch_size, device, dtype, device_map, max_memory):
    """GPTQ-protocol perplexity (and lm-eval accuracy) of an FP model, a simulated RPTQ quantization or a
    checkpoint."""
    from .data import eval_tokens
    from .evaluate import perplexity
    from .loading import default_seqlen, resolve_dtype
    placement, budgets, device = _placement(device, device_map, max_memory)
    if report_path and placement is not None:
        raise RptqError("--report measures the model on one device; drop --device-map (or --report)")
    tasks = tasks or (() if lm_eval_tasks else ("wikitext",))
    lm_eval_manager = None
    if lm_eval_tasks:
        from .lm_eval_bridge import task_manager
        # a missing lm-eval or an unknown task is said before anything is loaded
        lm_eval_manager = task_manager(list(lm_eval_tasks), lm_eval_include)
        if set(lm_eval_tasks) & set(tasks):
            raise RptqError(f"--lm-eval-task {sorted(set(lm_eval_tasks) & set(tasks))[0]} is also a --task; "
                            "results are keyed by task name: drop one of them")
    elif lm_eval_include or limit or num_fewshot is not None:
        raise RptqError("--lm-eval-include, --limit and --num-fewshot apply to lm-eval tasks; add --lm-eval-task NAME")
    if report_path and not tasks:
        raise RptqError("--report measures on a perplexity text; add --task (and --data-path)")
    if data_paths and len(data_paths) != len(tasks):
        raise RptqError(f"{len(data_paths)} --data-path for {len(tasks)} --task; give one file per task, in order")
    if json_path:
        _prepare_output(json_path, force, is_ours=_is_results_json, kind="results file", directory=False,
                        sources=(model,))
    if report_path:
        _prepare_output(report_path, force, is_ours=_is_report_json, kind="report file", directory=False,
                        sources=(model,))
    config = _quant_config(quant)
    compute_dtype = resolve_dtype(dtype, device)
    net, tokenizer, family = _load_any(model, compute_dtype, verify=not no_verify)
    if family is None and config is not None:
        raise RptqError(f"{model} is already quantized; drop the quantization flags to evaluate it as it is")
    _check_seqlen(seqlen, net.config)
    eval_seqlen = seqlen or default_seqlen(net.config)
    texts = {task: eval_tokens(task, tokenizer, seqlen=eval_seqlen, data_path=path)
             for task, path in zip(tasks, data_paths or [None] * len(tasks))}
    quantization = {"label": net.rptq_config.label, "checkpoint": model, **net.rptq_config.to_dict()} \
        if family is None else None
    fp_net = copy.deepcopy(net) if report_path and config is not None else None
    if config is not None:
        quantization = _quantize_in_memory(net, family, tokenizer, config, stats_path, calib_dataset, calib_path,
                                           nsamples, seqlen, seed, batch_size, device)
    from . import kernels
    label = quantization["label"] if quantization else "FP"
    data = dict(zip(tasks, data_paths or tasks))
    with _placed(net, device, placement, budgets, device_map, max_memory) as device:
        click.echo(f"backend: {kernels.backend(device)}", err=True)
        results = {task: perplexity(net, tokens, seqlen=eval_seqlen, batch_size=batch_size, desc=task)
                   for task, tokens in texts.items()}
        for task, r in results.items():
            click.echo(f"{model}  {label}  {task}: ppl {r['ppl']:.3f}  ({r['windows']} windows × {r['seqlen']})")
        if lm_eval_tasks:
            from .lm_eval_bridge import evaluate_tasks, format_metrics
            accuracy = evaluate_tasks(net, tokenizer, lm_eval_tasks, manager=lm_eval_manager, limit=limit,
                                      num_fewshot=num_fewshot, batch_size=batch_size)
            for task, r in accuracy.items():
                click.echo(f"{model}  {label}  {task}: {format_metrics(r)}")
            results.update(accuracy)
            data.update({task: f"lm-eval {lm_eval_include or ''}".strip() for task in accuracy})
    if json_path:
        _write_json(json_path, {"model": model, "quantization": quantization, "results": results})
    if family is None:
        _record_evaluation(model, results, data, compute_dtype, kernels.backend(device))
    if report_path:
        _write_report(report_path, net, fp_net, next(iter(texts.values())), eval_seqlen, label)


def _record_evaluation(checkpoint: str, results: dict, data: dict, dtype: torch.dtype, backend: str) -> None:
    """Append the results to the checkpoint's rptq.json and model card (a read-only checkpoint is left as is)."""
    from .model_card import record_evaluation, utc_now
    entry = {"date": utc_now(), "command": _command_line(), "tool_version": __version__, "results": results,
             "data": data, "dtype": str(dtype).removeprefix("torch."), "backend": backend}
    try:
        record_evaluation(Path(checkpoint), entry)
    except OSError as exc:
        click.echo(f"note: the results were not recorded in {checkpoint} ({exc.strerror or exc})", err=True)


def _write_json(path: str, payload: dict) -> None:
    from .atomic import atomic_write
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2) + "\n"))


def _write_report(path: str, net, fp_net, tokens, seqlen: int, label: str) -> None:
    """Per-quantizer error of ``net`` on the first windows of ``tokens``, and its KL from ``fp_net`` if given."""
    from .diagnose import REPORT_WINDOWS, activation_report
    if fp_net is not None:
        fp_net.to(next(net.parameters()).device)
    report = activation_report(net, tokens, seqlen=seqlen, max_windows=REPORT_WINDOWS, fp_model=fp_net)
    _write_json(path, {"label": label, **report})
    worst = sorted(report["points"].items(), key=lambda kv: -kv[1]["rel_mse"])[:3]
    kl = f"KL vs FP {report['kl_vs_fp']:.4f}; " if "kl_vs_fp" in report else ""
    click.echo(f"wrote {path}: {kl}largest relative MSE at "
               + ", ".join(f"{name} ({e['rel_mse']:.2e})" for name, e in worst))


def _quantize_in_memory(net, family, tokenizer, config, stats_path, calib_dataset, calib_path, nsamples, seqlen,
                        seed, batch_size, device, writer=None, resume=None, fingerprint=None) -> dict:
    """``net``: a model in memory or a StreamedModel; ``writer``: packs each layer when done (export.py);
    ``resume``: a ResumableRun (resume.py), given ``fingerprint(tokens, provenance)`` of this run's inputs."""
    from .stats_file import StatsFile
    from .quantize import quantize_model
    net_config = getattr(net, "model", net).config
    stats = None
    if stats_path:
        stats = StatsFile.load(stats_path)
        stats.check_model(net_config, family, stats_path)
    _fit_clusters(config, net_config, family)
    tokens, provenance = _calibration(tokenizer, net_config, stats, calib_dataset, calib_path, nsamples, seqlen, seed)
    if resume is not None:
        resume.begin(fingerprint(tokens, provenance))  # refuses before any layer is touched
    report = quantize_model(net, family, tokens, config, stats=stats, device=device, batch_size=batch_size,
                            seed=provenance["seed"], writer=writer, resume=resume)
    if resume is not None:
        resume.finish()
    return {"label": config.label, **config.to_dict(), "calibration": provenance,
            "seconds": {k: round(v, 3) for k, v in report.seconds.items()}}


def _fit_clusters(config, model_config, family) -> None:
    """Clamp a cluster count above its point's channels (per head for R2/R3), say so once, record what is used."""
    from .points import REORDERS
    if not config.reorder:
        return
    channels = family.cluster_channels(model_config)
    for point, asked in sorted(config.clusters.items()):
        if channels.get(point) and asked > channels[point]:
            per_head = " per head" if REORDERS[point].per_head else ""
            click.echo(f"note: --clusters {point}={asked} exceeds the {channels[point]} channels{per_head} of {point}; "
                       f"using {channels[point]} (recorded as such)", err=True)
            config.clusters[point] = channels[point]


def _load_any(model: str, dtype, verify: bool = True):
    """A packed rptq checkpoint → (model, tokenizer, None); an FP model → (model, tokenizer, family), on the CPU."""
    from .export import is_quantized_checkpoint, load_quantized
    from .loading import load_model
    if is_quantized_checkpoint(model):
        return (*load_quantized(model, dtype=dtype, verify=verify), None)
    return load_model(model, dtype)


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Checkpoint directory.")
@click.option("--force", is_flag=True,
              help="Replace an existing rptq checkpoint (or empty) directory; never anything else.")
@quant_options
@click.option("--resume", is_flag=True,
              help="Continue a killed run on the same -o at its first unfinished layer (same inputs required; the "
                   "result is byte-identical to an uninterrupted run).")
@calib_options
@model_options
@_run
def quantize(model, output, force, resume, quant, stats_path, calib_dataset, calib_path, nsamples, seqlen, seed,
             batch_size, device, dtype):
    """Quantize MODEL with RPTQ and write a packed checkpoint directory.

    Finished layers are kept durably in a temporary directory beside -o; after a crash or kill, the same command
    with --resume continues at the first unfinished layer. Without --resume such a directory is refused."""
    from .export import CheckpointWriter, is_quantized_checkpoint, save_quantized, source_hashes
    from .loading import open_model, resolve_device, resolve_dtype
    from .report import checkpoint_summary
    from .resume import ResumableRun, claim_interrupted, fingerprint, new_directory
    # the killed run's directory is found (and taken over) before the stale-temporary cleanup would remove it
    resumed = claim_interrupted(output, resume, lambda line: click.echo(line, err=True))
    _prepare_output(output, force, is_ours=is_quantized_checkpoint, kind="checkpoint directory", directory=True,
                    sources=(model,))  # before the expensive part, not only when writing
    config = _quant_config(quant)
    if config is None:
        raise RptqError("nothing to quantize: give --wbits/--abits below 16 or a --config preset (e.g. w4a4kv)")
    device = resolve_device(device)
    start = time.perf_counter()
    compute_dtype = resolve_dtype(dtype, device)
    streamed = open_model(model, compute_dtype)  # weights stay in their files until needed
    net, tokenizer, family = streamed.model, streamed.tokenizer, streamed.family
    _check_seqlen(seqlen, net.config)
    load_seconds = time.perf_counter() - start
    model_files = source_hashes(model)

    def inputs_fingerprint(tokens, calibration):
        return fingerprint(model=model, model_files=model_files, model_config=net.config, quant_config=config,
                           calibration=calibration, tokens=tokens, stats_path=stats_path, dtype=compute_dtype,
                           device=device, batch_size=batch_size)

    # each layer is read, quantized, packed into the checkpoint's shards and released in turn
    directory = resumed if resumed is not None else new_directory(output)  # created by the writer
    with CheckpointWriter(output, force=force, source=model, fetch=streamed.read, directory=directory) as writer:
        run = ResumableRun(writer, echo=lambda line: click.echo(line, err=True))
        quantization = _quantize_in_memory(streamed, family, tokenizer, config, stats_path, calib_dataset,
                                           calib_path, nsamples, seqlen, seed, batch_size, device, writer,
                                           resume=run, fingerprint=inputs_fingerprint)
        start = time.perf_counter()
        # --resume changes how the checkpoint was reached, not what it is: the recorded command leaves it out
        provenance = {"source_model": model, "source_files_sha256": model_files,
                      "command": _command_line(drop=("--resume",)), "calibration": quantization["calibration"],
                      "stats_file": stats_path,
                      "seconds": {"load": round(load_seconds, 3), **quantization["seconds"]}}
        save_quantized(net, tokenizer, config, output, provenance=provenance, force=force, writer=writer)
    write_seconds = time.perf_counter() - start
    total = load_seconds + sum(quantization["seconds"].values()) + write_seconds
    click.echo(f"wrote {output} ({config.label}, {config.mode} mode) in {total:.1f}s")
    click.echo(checkpoint_summary(Path(output), model, net))
    click.echo(_time_and_memory_line({"load": load_seconds, **quantization["seconds"], "write": write_seconds}))


def _time_and_memory_line(seconds: dict) -> str:
    """Peak resident memory of this process and the seconds of each phase (the layer phases summed over layers;
    after --resume they include the interrupted run's)."""
    from .process import peak_rss_mb
    phases = ", ".join(f"{name} {value:.1f}s" for name, value in seconds.items())
    return f"peak RSS {peak_rss_mb() / 1024:.2f} GiB; time per phase: {phases}"


@main.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0: greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")
@click.option("--verbose", "-v", is_flag=True, help="Backend, speed and KV-cache bytes per token.")
@verify_option
@model_options
@placement_options
@_run
def generate(model, prompt, max_new_tokens, temperature, top_p, seed, verbose, no_verify, device, dtype, device_map,
             max_memory):
    """Generate text from MODEL (an rptq checkpoint or an FP model) with its packed KV cache."""
    import torch

    from . import kernels
    from .loading import resolve_dtype
    from .nn.kv_cache import PackedKVCache
    placement, budgets, device = _placement(device, device_map, max_memory)
    net, tokenizer, _ = _load_any(model, resolve_dtype(dtype, device), verify=not no_verify)
    inputs = tokenizer(prompt, return_tensors="pt")
    _check_generation_length(inputs["input_ids"].shape[1], max_new_tokens, net.config)
    cache = PackedKVCache.from_model(net, max_length=inputs["input_ids"].shape[1] + max_new_tokens)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    try:
        with _placed(net, device, placement, budgets, device_map, max_memory) as device, torch.no_grad():
            inputs = inputs.to(device)
            start = time.perf_counter()
            out = net.generate(**inputs, max_new_tokens=max_new_tokens, past_key_values=cache,
                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
            seconds = time.perf_counter() - start
    except RuntimeError as exc:  # torch.multinomial's word for NaN/inf logits; anything else is ours
        if "probability tensor contains" not in str(exc):
            raise
        raise RptqError(f"sampling met NaN or infinite probabilities: {model} produces NaN/inf logits (broken "
                        "weights, or an overflow in this dtype: try --dtype float32)") from None
    new_tokens = out.shape[1] - inputs["input_ids"].shape[1]
    click.echo(tokenizer.decode(out[0], skip_special_tokens=True))
    if verbose:
        click.echo(f"backend: {kernels.backend(device)}; {new_tokens} tokens in {seconds:.2f}s "
                   f"({new_tokens / seconds:.1f} tokens/s)", err=True)
        if cache is not None:
            from .report import kv_bytes_line
            click.echo(kv_bytes_line(cache), err=True)


def _check_generation_length(prompt_tokens: int, max_new_tokens: int, model_config) -> None:
    """Prompt and new tokens must fit the model's positions; say how many do, before generating anything."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if not positions or prompt_tokens + max_new_tokens <= positions:
        return
    if prompt_tokens >= positions:
        raise RptqError(f"the prompt is {prompt_tokens} tokens, the model has {positions} positions; shorten it to at "
                        f"most {positions - 1} tokens to generate anything")
    raise RptqError(f"the prompt ({prompt_tokens} tokens) and --max-new-tokens {max_new_tokens} exceed the model's "
                    f"{positions} positions; {positions - prompt_tokens} new tokens fit: pass --max-new-tokens "
                    f"{positions - prompt_tokens} or shorten the prompt")


def _is_memory_json(path: Path) -> bool:
    """A file `rptq memory --json` wrote."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        return isinstance(data, dict) and {"model", "shape", "columns"} <= set(data)
    return False


@main.command()
@click.argument("model")
@config_options
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1), help="Sequences of the KV cache.")
@click.option("--seqlen", default=2048, show_default=True, type=click.IntRange(1), help="Tokens per sequence.")
@click.option("--nsamples", default=CALIB_DEFAULTS["nsamples"], show_default=True, type=click.IntRange(1),
              help="Calibration windows of `rptq quantize`.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the figures (bytes).")
@click.option("--force", is_flag=True, help="Replace an existing --json file (only one rptq memory wrote).")
@_run
def memory(model, quant, batch, seqlen, nsamples, json_path, force):
    """Predict MODEL's memory from its config.json alone: weights, KV cache, peaks of quantize and of running.
    Without --config, --wbits or --abits: a column for each of the paper's presets (w4a16 w4a8 w4a4kv w4a3kv
    w3a3kv), with the other flags given applied to each."""
    from .config import build_config
    from .memory import PAPER_PRESETS, format_report, memory_report, read_config
    if json_path:
        _prepare_output(json_path, force, is_ours=_is_memory_json, kind="memory JSON", directory=False)
    config = _quant_config(quant)
    if config is None and (quant["preset"] or quant["wbits"] or quant["abits"]):
        raise RptqError("nothing is quantized with these settings: give --wbits/--abits below 16")
    if config is None:  # the paper's columns, with whatever other flags were given
        given = _config_flags(dict(quant, wbits=None, abits=None, kv_only=None))
        configs = {c.label: c for c in (build_config(p, **given) for p in PAPER_PRESETS)}
    else:
        configs = {config.label: config}
    report = memory_report(read_config(model), configs, batch, seqlen, nsamples, source=model)
    click.echo(format_report(report))
    if json_path:
        _write_json(json_path, report)


@main.command()
@click.argument("checkpoint")
@click.option("--format", "fmt", required=True, type=click.Choice(["compressed-tensors"]),
              help="compressed-tensors: pack-quantized, for transformers and vLLM (weight-only checkpoints).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing export directory (only one rptq wrote).")
@verify_option
@_run
def export(checkpoint, fmt, output, force, no_verify):
    """Export a weight-only rptq CHECKPOINT (W4A16, W3A16, W8A16) to another runtime's format."""
    from .ct_export import export_compressed_tensors
    from .export import is_quantized_checkpoint
    if not is_quantized_checkpoint(checkpoint):
        raise RptqError(f"{checkpoint} is not an rptq checkpoint; make one with `rptq quantize MODEL -o DIR`")
    summary = export_compressed_tensors(checkpoint, output, force=force, verify=not no_verify)
    groups = "per channel" if summary["group_size"] is None else (
        f"groups of {summary['group_size']}" + (" (act-order, g_idx)" if summary["actorder"] else ""))
    click.echo(f"wrote {output}: compressed-tensors pack-quantized, {summary['bits']}-bit, {groups}")


def _is_inspect_png(path: Path) -> bool:
    """A figure `rptq inspect` wrote (its PNG text chunk says so)."""
    with contextlib.suppress(OSError):
        head = path.read_bytes()[:4096]
        return head.startswith(b"\x89PNG") and b"rptq inspect" in head
    return False


def _is_inspect_json(path: Path) -> bool:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        return isinstance(data, dict) and {"source", "layer", "point", "clusters"} <= set(data)
    return False


@main.command()
@click.argument("source", metavar="MODEL_OR_STATS")
@click.option("--layer", required=True, type=int, help="Decoder layer (0-based).")
@click.option("--point", default="R1", show_default=True, type=click.Choice(list(REORDER_POINT_NAMES)),
              help="Reorder point (R2 shows K, R3 shows V).")
@click.option("--clusters", "n_clusters", type=click.IntRange(1), default=None,
              help="Clusters at this point (per head for R2/R3) [as `rptq quantize`: 32, or 4 per head].")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="PNG to write.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the ranges, clusters and summary as JSON.")
@click.option("--force", is_flag=True, help="Replace an existing -o / --json file (only one rptq inspect wrote).")
@calib_options
@model_options
@_run
def inspect(source, layer, point, n_clusters, output, json_path, force, calib_dataset, calib_path, nsamples, seqlen,
            seed, batch_size, device, dtype):
    """Draw each channel's calibrated (min, max) at one reorder point, coloured by cluster, before and after the
    reorder (the paper's Figure 1). MODEL_OR_STATS: a stats file from `rptq calibrate`, or a model (calibrated
    here)."""
    from .stats_file import StatsFile, is_stats_file
    from .inspect_ranges import inspect_layer
    if output is None and json_path is None:
        raise RptqError("nothing to write: give -o ranges.png and/or --json ranges.json")
    if output:
        _prepare_output(output, force, is_ours=_is_inspect_png, kind="inspect PNG", directory=False)
    if json_path:
        _prepare_output(json_path, force, is_ours=_is_inspect_json, kind="inspect JSON", directory=False)
    stats_file = StatsFile.load(source) if is_stats_file(Path(source)) else None

    def calibration(tokenizer, net_config):
        _check_seqlen(seqlen, net_config)
        return _calibration(tokenizer, net_config, None, calib_dataset, calib_path, nsamples, seqlen, seed)

    summary, text = inspect_layer(source, stats_file, layer, point, n_clusters=n_clusters, seed=seed,
                                  calibration=calibration, device=device, dtype=dtype, batch_size=batch_size,
                                  png=output)
    click.echo(text)
    if json_path:
        _write_json(json_path, summary)
    for path in (output, json_path):
        if path:
            click.echo(f"wrote {path}")


@main.command()
@click.option("--quick", is_flag=True, help="Fewer shapes and repeats (about a minute).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the rows as JSON.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch and kernel threads [all cores].")
@click.option("--e2e-model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Also decode this fp model directory quantized W4A16 and W4A4KV (RTN) against its HF generate.")
@_run
def bench(quick, json_path, threads, e2e_model):
    """Time the rptq:: kernels against torch baselines measured in the same run, on this machine."""
    from .bench import run_bench
    run_bench(quick=quick, threads=threads, json_path=json_path, echo=click.echo, e2e_model=e2e_model)


if __name__ == "__main__":
    main()
