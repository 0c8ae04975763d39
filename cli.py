"""`sora`: the command line. Parses arguments, loads the config, calls one pipelines function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from pipelines import USER_ERRORS, commands
from pipelines.config import CLEAR

app = typer.Typer(
    name="sora",
    help="Open-Sora-style text-to-video on Ray: pre-encode a video dataset once, "
    "train STDiT from the cache, sample and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Flags shared by several commands.
ConfigArg = Annotated[Path, typer.Option("--config", "-c", help="Training config file (Open-Sora format).")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster to join (default: start a local one).")]
CkptOpt = Annotated[
    str | None,
    typer.Option(
        "--ckpt-path",
        help="Model weights: a `sora train` checkpoint folder, an experiment or --outputs folder (its newest "
        "checkpoint), a safetensors file or an Open-Sora .pth (sets model.from_pretrained).",
    ),
]


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _run(function, *args: Any, **kwargs: Any) -> Any:
    """Call a pipelines function; errors a user can fix end as one line and exit code 2."""
    try:
        return function(*args, **kwargs)
    except USER_ERRORS as error:
        _fail(str(error))


@app.command("demo-data")
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write clips, images and data.csv into.")],
    num: Annotated[int, typer.Option("--num", "-n", min=1, help="Number of good samples.")] = 24,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed writes the same files.")] = 0,
) -> None:
    """Write a small demo dataset: mp4 clips and images of moving shapes with captions."""
    csv_path = _run(commands.demo_data, out_dir, num=num, seed=seed)
    typer.echo(f"wrote {csv_path}")


@app.command("demo-eval")
def demo_eval(
    samples_dir: Annotated[
        Path, typer.Argument(metavar="SAMPLES_DIR", help="Folder of sampled videos (the --save-dir of `sora sample`).")
    ],
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="CSV of path,text rows to judge; relative paths are against its folder "
            "(default: SAMPLES_DIR/samples.csv).",
        ),
    ] = None,
    sheet: Annotated[
        Path | None,
        typer.Option(
            "--sheet",
            help="Contact sheet PNG to write: frames, prompt and verdicts per sample "
            "(default: SAMPLES_DIR/contact_sheet.png).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (every row, measured and captioned).")] = False,
) -> None:
    """Judge demo videos from their pixels: background colour, shape colour, shape and direction against the caption."""
    typer.echo(_run(commands.demo_eval, samples_dir, prompts, sheet, as_json), nl=False)


@app.command("debug-models")
def debug_models(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write t5/ and vae/ into.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights.")] = 0,
) -> None:
    """Write tiny T5 and VAE models (loadable with from_pretrained) for tests and demos."""
    folders = _run(commands.debug_models, out_dir, seed=seed)
    for role, folder in folders.items():
        typer.echo(f"{role}: {folder}")


@app.command("fit-demo-vae")
def fit_demo_vae(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the VAE (diffusers format) and fit.json into.")],
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=1,
            help="Optimizer steps, about 0.8 s each on 2 CPU cores [default: 1000, as the committed VAE].",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights and the frames; same seed, same VAE.")] = 0,
) -> None:
    """Fit a small SD-geometry VAE that reconstructs demo frames; use it as vae.from_pretrained."""
    report = _run(commands.fit_demo_vae, out_dir, steps=steps, seed=seed)
    kept = round(100 * report["held_out_colors_kept"])
    typer.echo(
        f"wrote {out_dir}: held-out PSNR {report['held_out_psnr_db']} dB, background and shape colour kept in "
        f"{kept} % of held-out frames, in {report['seconds']} s"
    )


@app.command("config")
def config(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="Config file to check.")],
    kind: Annotated[
        str | None, typer.Option("--kind", help="train or inference (default: guessed from the keys).")
    ] = None,
) -> None:
    """Validate a config file and print it resolved, defaults included."""
    typer.echo(_run(commands.show_config, config_path, kind), nl=False)


@app.command("preprocess")
def preprocess(
    data: Annotated[Path, typer.Argument(metavar="DATA.csv", help="CSV (or Parquet) with path,text columns.")],
    config_path: ConfigArg,
    cache_dir: Annotated[
        str | None,
        typer.Option(
            "--cache-dir", help="Cache folder or URI (s3://, gs://, file://; default: the config's cache_dir)."
        ),
    ] = None,
    address: AddressOpt = None,
    reuse: Annotated[
        list[str] | None,
        typer.Option(
            "--reuse",
            metavar="OTHER_CACHE",
            help="A finished cache whose encodings to take where their keys match (repeatable). The cache "
            "folder's own current version is always reused.",
        ),
    ] = None,
) -> None:
    """Probe, bucket and pre-encode a dataset into a cache of VAE latents and T5 embeddings.

    Run again after changing the table or the config: only rows whose encodings changed are
    encoded (a caption edit costs no VAE call, a new clip costs its own), the rest is taken from
    the cache's current version, which stays readable until the new one is complete.
    """
    typer.echo(_run(commands.preprocess, data, config_path, cache_dir, address, reuse or []), nl=False)


cache_app = typer.Typer(help="Inspect a preprocessed cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("verify")
def cache_verify(
    cache_dir: Annotated[str, typer.Argument(metavar="DIR", help="The cache folder (or URI) to check.")],
) -> None:
    """Check a cache from its manifest down to every tensor: shard checksums, shapes, finite values.

    Exit code 0 when it is intact, 1 when a problem was found (each named), 2 when DIR is not a
    finished cache.
    """
    from pipelines.cache_verify import verify

    result = _run(verify, cache_dir)
    typer.echo(result.format(), nl=False)
    raise typer.Exit(code=0 if result.ok else 1)


@app.command("bucket-report")
def bucket_report(
    source: Annotated[
        str, typer.Argument(help="A CSV/Parquet table, or a cache (folder or URI) from `sora preprocess`.")
    ],
    config_path: ConfigArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw the report to this PNG.")] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Ray cluster whose tasks read and bucket the table (default: tables over 256 MiB go "
            "through a local Ray instance, smaller ones are read here; memory stays bounded either way).",
        ),
    ] = None,
) -> None:
    """Show how a dataset falls into the config's buckets, and what is dropped and why.

    A table is streamed a batch of rows at a time and never held whole, so tables larger than
    this machine's memory work; only counts and a few examples per drop reason are kept."""
    typer.echo(_run(commands.bucket_report, source, config_path, as_json, plot, address), nl=False)
    if plot is not None:
        typer.echo(f"plot: {plot}", err=True)


@app.command("train")
def train(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="Training config file.")],
    data_path: Annotated[
        str | None, typer.Option("--data-path", help="Cache folder to train from (sets cache_dir).")
    ] = None,
    outputs: Annotated[str | None, typer.Option("--outputs", help="Where experiments are saved.")] = None,
    load: Annotated[str | None, typer.Option("--load", help="Checkpoint folder to resume from.")] = None,
    ckpt_path: CkptOpt = None,
    num_workers: Annotated[
        int, typer.Option("--num-workers", min=1, help="Ray Train workers (one GPU each on a GPU cluster).")
    ] = 1,
    gpu: Annotated[bool | None, typer.Option("--gpu/--no-gpu", help="Train on GPUs (default: if any).")] = None,
    address: AddressOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Batch size (fixed-size form).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Number of epochs.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    wandb: Annotated[bool | None, typer.Option("--wandb/--no-wandb", help="Log to wandb.")] = None,
    sp_size: Annotated[
        int | None,
        typer.Option(
            "--sp-size",
            min=1,
            help="Workers that split each sample's tokens (sequence parallelism; sets sp_size, and above 1 "
            "plugin 'zero2-seq'). --num-workers must be a multiple of it: workers = data-parallel groups x sp_size.",
        ),
    ] = None,
) -> None:
    """Train STDiT with Ray Train and DeepSpeed from a preprocessed cache."""
    overrides = {
        "sp_size": sp_size,
        "plugin": "zero2-seq" if sp_size is not None and sp_size > 1 else None,
        "cache_dir": data_path,
        "outputs": outputs,
        "load": load,
        "model.from_pretrained": ckpt_path,
        "batch_size": batch_size,
        "lr": lr,
        "epochs": epochs,
        "seed": seed,
        "wandb": wandb,
    }
    experiment = _run(commands.train, config_path, overrides, num_workers, gpu, address)
    typer.echo(f"experiment: {experiment}")


@app.command("search-batch-size")
def search_batch_size(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="Training config with a bucket_config.")],
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            help="Memory a training process may use, e.g. 16GiB: needed on CPU; on a GPU it defaults to the "
            "GPU's memory.",
        ),
    ] = None,
    gpu: Annotated[bool | None, typer.Option("--gpu/--no-gpu", help="Search on the GPU (default: if any).")] = None,
    equalize: Annotated[
        bool,
        typer.Option(
            "--equalize/--no-equalize",
            help="Give the other buckets the batch whose step time matches the base bucket's (Open-Sora's search).",
        ),
    ] = False,
    base: Annotated[
        str | None, typer.Option("--base", help="Base bucket for --equalize, RES:T (default: the most tokens).")
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="Largest batch tried for a bucket given a plain batch size.")
    ] = 256,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed training steps per trial (after one).")] = 2,
    text_dim: Annotated[
        int | None, typer.Option("--text-dim", help="Caption width, when the text encoder's cannot be read.")
    ] = None,
) -> None:
    """Find, per bucket, the largest batch whose training step fits the device; print a bucket_config to paste.

    Batch sizes tuned on one GPU model rarely fit another: this measures them where you train.
    Each trial is real training steps (model, EMA, DeepSpeed ZeRO-2 with AdamW) at the bucket's
    largest size, in a fresh process. A bucket's candidates are its search range
    (keep_prob, (min, max[, step])) as in Open-Sora's benchmark.py, or 1..--max-batch.
    """
    options = {"max_memory": max_memory, "gpu": gpu, "equalize": equalize, "base": base, "max_batch": max_batch,
               "steps": steps, "text_dim": text_dim}  # fmt: skip
    table = _run(commands.search_batch_size, config_path, **options)
    typer.echo(table, nl=False)


SAMPLE_HELP = (
    "Generate videos from prompts with a trained model: one mp4 per prompt in save_dir.\n\n"
    "Long video (the seed's Inference-long): --loop clips, each starting from the last "
    "--condition-frame-length frames of the one before. --reference-path and --mask-strategy insert "
    "frames of images or videos at chosen places (image-to-video, video extension). "
    "Every input is checked before a model loads."
)


@app.command("sample", help=SAMPLE_HELP)
def sample(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="Inference config file.")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt (repeatable).")] = None,
    prompt_path: Annotated[str | None, typer.Option("--prompt-path", help="File of prompts, one per line.")] = None,
    ckpt_path: CkptOpt = None,
    save_dir: Annotated[str | None, typer.Option("--save-dir", help="Folder for the mp4 files.")] = None,
    num_frames: Annotated[int | None, typer.Option("--num-frames", help="Frames per clip.")] = None,
    image_size: Annotated[
        tuple[int, int] | None, typer.Option("--image-size", help="Height and width.", metavar="H W")
    ] = None,
    fps: Annotated[int | None, typer.Option("--fps", help="Frames per second of the mp4.")] = None,
    num_sampling_steps: Annotated[int | None, typer.Option("--num-sampling-steps", help="Steps.")] = None,
    cfg_scale: Annotated[float | None, typer.Option("--cfg-scale", help="Guidance scale.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Prompts per batch.")] = None,
    loop: Annotated[
        int | None,
        typer.Option("--loop", help="Long video: clips to generate; total frames = loop x (N - C) + C."),
    ] = None,
    condition_frame_length: Annotated[
        int | None,
        typer.Option("--condition-frame-length", help="Long video: last frames of a clip (C) that start the next."),
    ] = None,
    reference_path: Annotated[
        list[str] | None,
        typer.Option(
            "--reference-path",
            help="Per prompt (repeat in prompt order; '' for none): ';'-separated images/videos to condition on.",
        ),
    ] = None,
    mask_strategy: Annotated[
        list[str] | None,
        typer.Option(
            "--mask-strategy",
            help="Per prompt (repeat in prompt order; '' for none): ';'-separated tuples "
            "ref_index,loop_index,ref_start_frame,num_frames,target_location[,edit_ratio]; "
            "e.g. '0,0,0,1,0' puts the first reference's first frame first.",
        ),
    ] = None,
) -> None:
    """Generate videos from prompts with a trained model: one mp4 per prompt in save_dir."""
    overrides = {
        # --prompt-path alone replaces the config's prompt list, as the seed's override does.
        "prompt": prompt or (CLEAR if prompt_path else None),
        "prompt_path": prompt_path,
        "model.from_pretrained": ckpt_path,
        "save_dir": save_dir,
        "num_frames": num_frames,
        "image_size": image_size,
        "fps": fps,
        "scheduler.num_sampling_steps": num_sampling_steps,
        "scheduler.cfg_scale": cfg_scale,
        "seed": seed,
        "batch_size": batch_size,
        "loop": loop,
        "condition_frame_length": condition_frame_length,
        # One entry per prompt; an empty entry ('') is a prompt without conditioning.
        "reference_path": [entry or None for entry in reference_path] if reference_path else None,
        "mask_strategy": [entry or None for entry in mask_strategy] if mask_strategy else None,
    }
    for path in _run(commands.sample, config_path, overrides):
        typer.echo(path)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
