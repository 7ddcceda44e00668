"""`sdxl-bench`: txt2img, build, report and history, with the flag names of TensorRT's demo_txt2img_xl.py.

The flags are defined in `flags`; a run is checked, loaded and prepared by `sdxl_core.run`. This module turns
each command's arguments into that, and writes and prints what came of it.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

from sdxl_core import run
from sdxl_core.commands.flags import BENCH_COMMANDS, bench_module, build_parser, variant_from_args
from sdxl_core.errors import UserError
from sdxl_core.run import DEFAULT_PROMPT, say
from sdxl_core.startup import Startup
from sdxl_core.variants import VARIANTS, Variant, check_range, get_variant, on_model

__all__ = ["build_parser", "variant_from_args", "main"]


def run_options(args, output_dir: str | None = None) -> run.Options:
    """txt2img's and build's runtime flags as run options; every run prints a line per phase."""
    return run.Options(
        engine_dir=args.engine_dir,
        onnx_dir=args.onnx_dir,
        output_dir=output_dir,
        device=args.device,
        half=args.half,
        threads=args.threads,
        allow_build=not args.no_build,
        progress=not args.no_progress,
        phase_lines=True,
        use_cuda_graph=True if args.use_cuda_graph else None,
        lock_timeout=args.lock_timeout,
    )


def cmd_txt2img(args, startup: Startup) -> int:
    variant = variant_from_args(args)
    check_range("--seed", args.seed)
    check_range("--batch-count", args.batch_count)
    check_range("--num-warmup-runs", args.num_warmup_runs)
    prompt = " ".join(args.prompt) or DEFAULT_PROMPT
    ready = run.prepare(variant, run_options(args, output_dir=args.output_dir), startup=startup)
    import torch

    if args.num_warmup_runs:
        say(f"warm-up: {args.num_warmup_runs} untimed run(s) of {variant.steps} steps")
    say(f"generating {args.batch_count} batch(es) of {variant.batch_size} image(s), {variant.steps} steps each")
    batches = functools.partial(
        ready.batches,
        prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        progress=not args.no_progress,
        generator=torch.Generator("cpu").manual_seed(args.seed),  # one random stream over all timed batches
    )
    with startup.phase("warmup", ready.device):
        batches(batch_count=0, warmup_runs=args.num_warmup_runs)
    with startup.phase("first_image", ready.device):
        results = batches(batch_count=1)
    startup.finish()
    results += batches(batch_count=args.batch_count - 1)
    report, report_path, image_paths = write_outputs(args, ready, prompt, results, startup)

    from sdxl_core.reports import run_report

    print(run_report.stage_table(report))
    print(run_report.startup_table(report, until="first image"))
    print(f"wrote {report_path}")
    print(f"wrote {len(image_paths)} image(s): {', '.join(image_paths)}")  # last: what people open next
    return 0


def write_outputs(args, ready: run.Run, prompt: str, results, startup: Startup):
    """The PNGs, then the report that lists them. A failed write (a full disk halfway through a batch) removes the
    files this run wrote, so no image is left without its report; the error goes on as one line."""
    from sdxl_core.files import atomic_path, atomic_write_text
    from sdxl_core.reports import run_report

    out_dir = Path(args.output_dir)
    stem = output_stem(
        ready.variant, prompt, args.negative_prompt, args.seed, args.batch_count, ready.device, args.half
    )
    report_path = out_dir / f"{stem}.json"
    image_paths: list[str] = []
    try:
        for b, result in enumerate(results):
            for i, image in enumerate(result.images):
                path = out_dir / f"{stem}-b{b}-{i}.png"
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
                image_paths.append(str(path))
        report = run_report.make_report(
            ready.variant,
            ready.engines,
            results,
            prompt=prompt,
            seed=args.seed,
            images=image_paths,
            command=shlex.join(sys.argv),
            negative_prompt=args.negative_prompt,
            half=args.half,
            startup=startup,
        )
        atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    except BaseException:
        for path in image_paths:
            Path(path).unlink(missing_ok=True)
        raise
    return report, report_path, image_paths


def output_stem(
    variant: Variant, prompt: str, negative_prompt: str, seed: int, batch_count: int, device, half: str
) -> str:
    """`<variant>-s<seed>-<hash>`: the hash covers the prompts and every setting that changes the images, so runs
    that differ in any of them write different files; the same run again replaces its own files."""
    settings = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "variant": dataclasses.asdict(variant),
        "batch_count": batch_count,
        "device": device.type,
        "half": half if device.type == "cuda" else None,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{variant.name}-s{seed}-{digest}"


def cmd_build(args, startup: Startup) -> int:
    if not args.engine_dir:
        raise UserError("sdxl-bench build needs --engine-dir: that is where the engines go")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if not names:
        raise UserError(f"--variants {args.variants!r} names no variant: choose from {', '.join(VARIANTS)}")
    variants = [on_model(get_variant(n), args.model, backend=args.backend) for n in names]  # a bad name: no work
    if args.calibration_size is not None:
        check_range("--calibration-size", args.calibration_size)
        variants = [v.replace(calibration_size=args.calibration_size) if v.is_quantized else v for v in variants]
    if args.report:
        from sdxl_core.files import check_writable_dir

        check_writable_dir(Path(args.report).parent, "--report")
    options = run_options(args)
    device = [run.check(variant, options, startup) for variant in variants][0]
    run.start_kernel_builds(variants, device)
    from sdxl_core import hardware
    from sdxl_core.reports import run_report

    built = []
    for i, variant in enumerate(variants):
        timed = startup if i == 0 else Startup()  # each variant's table counts from where it starts
        ready = run.prepare(variant, options, device=device, startup=timed)
        timed.finish()
        info = ready.info
        print(f"{variant.name}: {info.mode} {info.engine_path} ({(info.engine_bytes or 0) / 2**20:.1f} MiB)")
        record = {
            "variant": variant.name,
            "engine": ready.info_dict(),
            "startup_s": timed.record(),
            "startup_notes": timed.notes,
        }
        print(run_report.startup_table(record, until=f"{variant.name} engine ready"))
        built.append(record)
    if args.report:
        from sdxl_core.files import atomic_write_text

        report = {
            "schema": run_report.REPORT_SCHEMA_VERSION,
            "command": shlex.join(sys.argv),
            "built": built,
            "libraries": hardware.library_versions(device),
            "device": hardware.device_info(device),
        }
        atomic_write_text(args.report, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.report}")
    return 0


def cmd_report(args) -> int:
    from sdxl_core.reports import run_report

    text = run_report.markdown_summary([Path(p) for p in args.reports])
    if args.output:
        from sdxl_core.files import atomic_write_text, check_writable_dir

        check_writable_dir(Path(args.output).parent, "--output")
        atomic_write_text(args.output, text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def cmd_history(args) -> int:
    from sdxl_core.files import check_writable_dir
    from sdxl_core.reports.history import history_report

    check_writable_dir(args.output_dir, "--output-dir")
    markdown, plot = history_report(args.storage, args.output_dir)
    print(Path(markdown).read_text())
    print(f"wrote {markdown} and {plot}")
    return 0


# What the machine can do about an OSError, by errno: the fix goes on the same line as the error.
ENVIRONMENT_HINTS = {
    errno.ENOSPC: "free some space, or point --output-dir, --engine-dir or --onnx-dir at another disk",
    errno.EDQUOT: "free some of your quota, or point --output-dir, --engine-dir or --onnx-dir elsewhere",
    errno.EFBIG: "the file size limit (ulimit -f) is too low for this file",
    errno.EACCES: "check the permissions, or point --output-dir, --engine-dir or --onnx-dir elsewhere",
    errno.EPERM: "check the permissions, or point --output-dir, --engine-dir or --onnx-dir elsewhere",
    errno.EROFS: "that file system is read-only: point --output-dir, --engine-dir or --onnx-dir elsewhere",
    errno.ENOTDIR: "a path component is a file, not a directory",
    errno.EISDIR: "a directory stands where a file should be",
}


def environment_error(exc: BaseException) -> str | None:
    """One line for an error the machine caused (disk full, permissions, read-only, out of memory), else None.

    Writers outside Python's io (safetensors, torch.save) report a full disk in their own words; those are
    recognised by their OS error number or text.
    """
    text = str(exc)
    number = exc.errno if isinstance(exc, OSError) else None
    found = re.search(r"(?:os error|\bcode:) (\d+)", text)  # Rust's io::Error, shown or debug-printed
    if number is None and found:
        number = int(found.group(1))
    if number is None and ("No space left on device" in text or "file write failed" in text):
        number = errno.ENOSPC
    if type(exc).__name__ == "OutOfMemoryError":
        return "out of GPU memory: lower --batch-size or the image size, or use a GPU with more free memory"
    if isinstance(exc, MemoryError) or "can't allocate memory" in text:
        return "out of memory: lower --batch-size or the image size"
    if number is None and not isinstance(exc, OSError):
        return None
    where = getattr(exc, "filename", None)
    reason = os.strerror(number) if number else (text.splitlines() or [type(exc).__name__])[0]
    hint = ENVIRONMENT_HINTS.get(number, "check the path and the machine")
    return f"{reason}{f' ({where})' if where else ''}: {hint}"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Without `argv` this process was started to run it (the entry point, `python -m`), so its
    start-up table counts from the process's start; a caller passing `argv` counts from this call."""
    startup = Startup.from_process_start() if argv is None else Startup()
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(bench_flags=[w for w in words[:1] if w in BENCH_COMMANDS])
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # refused by the subcommand, so the error points at its own --help
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    commands = {
        "txt2img": functools.partial(cmd_txt2img, startup=startup),
        "build": functools.partial(cmd_build, startup=startup),
        "report": cmd_report,
        "history": cmd_history,
    }
    try:
        code = (commands.get(args.command) or bench_module(args.command).main)(args)
        sys.stdout.flush()  # a reader that went away shows here, in the handler below, not at exit
        return code
    except BrokenPipeError:  # the reader stopped reading (`| head`): not an error of this run, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit would fail again
        return 141  # 128 + SIGPIPE: what a shell reports for a writer that a closed pipe stopped
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        line = environment_error(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
